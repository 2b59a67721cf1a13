"""Regenerates ``corpus.txt``, the text the generated models' tokenizers are trained on.

Run ``python hivemart_core/models/data/generate_corpus.py`` from the repository root. The
output is a pure function of this file: hand-written prose first, then sentences composed
from the word lists below by a seeded ``random.Random``. Nothing is downloaded; every word
here was written for Hivemart.

The corpus only has to teach a byte-level BPE tokenizer a few thousand plausible merges,
so it favours many distinct English words (with their inflections), numbers, punctuation
and a little code over literary merit. Changing it changes every generated model's
tokenizer and therefore its weights' meaning (not its digest recipe); do it deliberately.
"""

from __future__ import annotations

import random
from pathlib import Path

PROSE = """\
Once upon a time, a group of friends shared their computers to run a model too large for any one of them.
Each friend kept a few layers in memory and passed the numbers along, like buckets in a fire line.
When one of them closed a laptop to catch a train, another picked up the same layers, replayed what had been said, and the story went on as if nothing had happened.

The harbour was quiet before dawn. Gulls argued over a broken crate, a fisherman mended his nets by lantern light, and somewhere behind the warehouses a bakery oven ticked as it warmed.
By seven o'clock the market square was full: cheese from the northern valleys, apricots and figs from the south, barrels of salted herring, bolts of linen, copper kettles, candles, rope and tar.
Merchants shouted prices, apprentices counted coins twice, and a clerk with ink-stained fingers wrote every sale into a ledger that balanced to the last penny.

My grandmother kept a garden behind the chapel. She grew beans, leeks, parsnips, rhubarb and lavender, and she believed that tomatoes sulk if you talk about them unkindly.
In autumn we picked damsons and pears, boiled jam in the big enamel pot, and labelled the jars in her careful, slanting hand.
Winter evenings were for mending: socks, chairs, an old wireless set, a kite that never flew properly but was rebuilt every year anyway.

Science begins with noticing. Why does ice float? Why is the sky blue at noon and orange at sunset? Why do some seeds wait a whole winter before sprouting?
A good experiment changes one thing at a time, writes down what happened, and repeats the measurement until the noise is understood.
Thermometers, pendulums, prisms, magnets, batteries and microscopes have taught us more about the world than any amount of confident guessing.

The expedition left the valley in late spring. Twelve mules carried flour, oats, lentils, dried apples, tents, ropes, ice axes and a surveyor's theodolite wrapped in oilcloth.
They followed the river to the glacier, crossed a saddle of loose scree, and camped beside a frozen lake whose surface boomed and cracked all night.
On the ninth day the clouds lifted and they saw the summit ridge, white and impossibly close, glittering above a sea of cloud.

Cooking is chemistry you can eat. Onions soften and sweeten in butter; garlic burns if you look away; bread needs time, warmth and patience more than strength.
A simple soup: two leeks, three potatoes, a stick of celery, a litre of stock, salt, pepper and a bay leaf. Simmer gently for twenty-five minutes, then blend until smooth.
Serve it with crusty bread, a sharp cheddar, and conversation that wanders wherever it likes.

In the library the clocks ran slow. Readers leaned over atlases and almanacs, dictionaries and diaries, timetables of railways that closed a century ago.
A boy copied the orbits of the planets into his notebook: Mercury, Venus, Earth, Mars, Jupiter, Saturn, Uranus and Neptune, with their moons listed underneath like children.
The librarian stamped returned books with a satisfying thump and reminded everyone, in a whisper, that the building would close at half past five.

Trust between strangers is an invention, not an instinct. Markets work when promises are written down, when weights and measures are honest, and when cheating is costly.
A receipt is a small piece of memory that both sides agree on. A signature says: I was here, I did this, and you may hold me to it.
Escrow lets a buyer pay before the work is done without handing over the money for good; an auditor checks the work; a ledger remembers who owes whom.

The storm arrived at midnight. Shutters rattled, gutters overflowed, and the old elm at the end of the lane groaned like a ship at anchor.
By morning the lane was a river of leaves and twigs. Neighbours who had not spoken in years swept side by side, lent each other ladders, and shared a thermos of sweet tea.
Afterwards they agreed that the storm had been dreadful, and also, somehow, rather wonderful.
"""

CODE = """\
def generate(prompt, max_new_tokens=20): return model.generate(prompt, max_new_tokens=max_new_tokens)
for index, block in enumerate(blocks): hidden = block(hidden, position_embeddings=(cos, sin))[0]
if balance < amount: raise InsufficientCreditsError(f"need {amount}, have {balance}")
{"model_id": "llama-8x512", "start": 0, "end": 4, "price": 1200, "throughput": 35.5}
SELECT id, balance FROM ledger_account WHERE kind = 'wallet' AND balance >= 0;
x = torch.zeros(2, 3, dtype=torch.float32); y = x @ w.T + b
The quick brown fox jumps over the lazy dog. Pack my box with five dozen liquor jugs.
Numbers: 0 1 2 3 4 5 6 7 8 9 10 100 1000 3.14 2026. Punctuation: , . ; : ! ? ( ) [ ] { } " ' - _ / + = * % # @ & |
"""

NOUNS = """
apple anchor apron arch arrow atlas attic autumn badge bakery balcony ball banner barn barrel basket
beach beacon bean bell bench berry bicycle bird blanket block boat bone book boot bottle boundary
bowl branch bread bridge brook broom brother bucket budget building bundle butter button cabin cable
cake camera camp canal candle canyon captain card carpet carriage castle cat cathedral cellar chain chair
chalk chapter cheese cherry chimney church circle citizen city clerk cliff clock cloud coast coat coin
collar comet compass copper corner cottage council country courtyard cousin crate creek crew crown cup
curtain cushion customer dairy dance daughter debt deck desert desk diary dinner doctor dog door
dragon drawer dream drum duck eagle engine engineer envelope evening factory fair farm farmer feast
feather fence ferry field finger fire fish flag flame flower flute fog forest fork fortress fountain
fox friend frost fruit furnace garden gate gift glacier glass glove goat gold grain grape grass guard
guest guitar hall hammer harbour harvest hat hawk heart hedge helmet hill hive honey horizon horse
hospital hotel hour house island jacket jar jewel journey judge kettle key king kitchen kite knife
ladder lake lamp lane lantern leaf ledger lemon letter library lighthouse lily lion loaf lock machine
map market meadow merchant message meadow mill mirror monastery month moon morning mountain mouse
museum mushroom needle neighbour nest net newspaper night notebook number oak ocean office orchard
oven owl packet page palace paper parcel parrot path pearl pebble pencil pepper piano picture pillow
pilot pine planet plate pocket poem pond porch portrait post pot potato prince printer promise pump
puzzle queen question rabbit radio rail rain ribbon river road robot rock roof room rope rose sail
sailor salt sand saucer scale school scientist season seed shadow shelf shell shepherd ship shop
shore signal silver singer sister sky sleeve smile snow soldier song soup spark spoon spring square
stable stair star station statue steam stone storm story stove stream street string student summer
sun supper swan sword table tailor teacher telescope temple theatre thread ticket tiger timber tower
town track trader train traveller tree tunnel umbrella valley village violin voice wagon wall wallet
watch water wave weather well whale wheel whistle window winter wire wolf wood workshop writer yard
account adapter auction audit backup balance bandwidth benchmark borrower broker buyer cache checkpoint
client cluster contract credit daemon dataset deadline deposit digest dispute escrow failure fee
gradient graph guarantee hardware invoice kernel latency layer lender license loan matrix memory
network offer operator packet payment peer pipeline platform processor profit protocol provider
queue quota receipt record refund register replica request reputation reserve route sample scheduler
schema segment sequence server session shard signature span stake subscription supplier tensor
thread token transaction transfer validator vector vendor voucher wallet weight window worker
"""

IRREGULAR_PLURALS = {
    "mouse": "mice",
    "knife": "knives",
    "leaf": "leaves",
    "loaf": "loaves",
    "shelf": "shelves",
    "wolf": "wolves",
    "child": "children",
    "foot": "feet",
    "tooth": "teeth",
    "goose": "geese",
}

VERBS = """
accept add admire adopt advise agree allow announce answer appear arrange arrive ask attach avoid
bake balance bargain borrow bounce breathe brush build burn calculate call carry carve celebrate
change charge chase check chop clean climb close collect comfort compare complain compute confirm
connect consider contain cook copy count cover crack crawl cross dance decide decline deliver
depend describe design destroy discover divide double drag dream dress drift drop earn enjoy
escape examine expand explain explore fasten fetch fill finish fix float fold follow forgive
gather glow grab greet grow guard guess guide hammer handle hang harvest heal help hire hover hunt
hurry ignore imagine improve include inform insist inspect invent invite join judge jump kick knit
knock land laugh launch lean learn lend lift listen load lock look manage march mark marry measure
melt mend mix move name nod notice obey observe offer open order organise pack paint park pass
pause perform pick plan plant play point polish pour practise praise pray prefer prepare present
print promise protect provide pull pump punish push question race rain reach read receive record
refuse relax release remain remember remind repair repeat replace reply report request rescue
return rinse roll rush sail save scatter schedule scrub search settle shiver sign signal sketch
slip smile sort spill spray sprout squeeze stamp start stay steer step stir stitch store stretch
study suggest supply support surprise survive swap switch tap taste teach thank tick tidy touch
trace trade train transfer travel treat trust try tumble turn type unlock unpack upload use
verify visit wait walk wander want warm wash watch water wave weigh whisper whistle wink wish
wonder work worry wrap yawn
"""

IRREGULAR_PAST = {
    "build": "built",
    "burn": "burnt",
    "dream": "dreamt",
    "forgive": "forgave",
    "grow": "grew",
    "hang": "hung",
    "lend": "lent",
    "read": "read",
    "lean": "leant",
    "teach": "taught",
    "spill": "spilt",
}

ADJECTIVES = """
able ancient angry anxious bitter black blue bold brave bright brilliant broad broken brown busy calm
careful cheap cheerful clean clever cloudy cold common complex cosy crisp crooked curious damp dark
dear deep delicate dense distant dry dull dusty eager early easy elegant empty enormous exact fair
faint famous fancy fast fierce fine flat fragile free fresh friendly frozen full gentle giant glad
golden graceful grand great green grey handsome happy hard heavy hidden high hollow honest huge humble
hungry icy idle important jolly kind large late lazy light little lively local lonely long loud lovely
low loyal lucky magnificent mild modern modest narrow nasty neat nervous new noble noisy odd old
orange ordinary pale patient perfect plain pleasant polite poor precious pretty proud purple quick
quiet rapid rare raw ready real red remote rich rough round royal rusty sad safe salty secret sharp
shiny short shy silent silly simple slender slow small smooth soft solid sour spare splendid steady
steep sticky stiff still strange strict strong sturdy sudden sunny sweet swift tall tame tender thick
thin tidy tiny tough true ugly uneven unusual useful vast violet warm weak wealthy weary wet white
wide wild windy wise wooden worn yellow young zealous distributed encrypted idempotent measured
remote sharded signed trusted verified
"""

ADVERBS = """
almost always anxiously barely boldly briskly calmly carefully cheerfully clearly closely correctly
daily deliberately eagerly easily entirely equally eventually exactly fairly finally firmly fondly
frankly freely gently gladly gracefully gradually happily hardly honestly hourly hungrily instantly
jointly kindly largely lazily lightly loudly loyally merrily mostly nearly neatly nervously never
nightly noisily often openly patiently perfectly politely promptly proudly quickly quietly rapidly
rarely readily really recently regularly roughly safely seldom sharply shyly silently simply slowly
smoothly softly sometimes soon steadily strictly suddenly surely swiftly tenderly thoroughly tightly
truly usually warmly weekly wildly wisely yearly
"""

NAMES = """
Ada Alan Alice Amara Anika Arjun Astrid Beatrice Benedict Bruno Camille Carlos Cecilia Chen Clara
Dario Dmitri Edith Elena Emeka Esther Farah Felix Fiona Freya Gustav Hana Hugo Ines Ivan Jamal
Jonas Julia Kai Kamala Keiko Lars Leila Lena Liam Lucia Magnus Malik Marta Mateo Mina Nadia Nils
Noor Olga Omar Oscar Paulo Priya Quentin Rafael Rosa Ruth Sami Sofia Stellan Tariq Tomas Una Uri
Vera Viktor Wanda Wei Xavier Yara Yusuf Zara Zoltan
"""

PLACES = """
Aberdeen Alexandria Amsterdam Antwerp Athens Bergen Bologna Bordeaux Bristol Cairo Calais Cardiff
Cork Dakar Delft Dublin Dundee Florence Galway Geneva Genoa Ghent Granada Hamburg Helsinki Kyoto
Lagos Lisbon Lyon Marseille Milan Montreal Munich Nairobi Naples Oslo Oxford Palermo Porto Prague
Quebec Riga Rotterdam Salzburg Seville Sydney Tallinn Tangier Trieste Turin Utrecht Valencia Venice
Vienna Vilnius Warsaw Wellington York Zagreb Zurich
"""

# Verbs that double their last consonant before -ed and -ing (British spelling).
DOUBLING = set("chop drop slip tap step nod plan wrap swap drag grab knit stir travel label signal".split())

MONTHS = "January February March April May June July August September October November December".split()
DAYS = "Monday Tuesday Wednesday Thursday Friday Saturday Sunday".split()
COUNTS = "two three four five six seven eight nine ten eleven twelve twenty forty hundred thousand".split()
PREPOSITIONS = "across along beside behind beyond inside near outside over through toward under within".split()
CONNECTIVES = ["because", "although", "while", "after", "before", "until", "since", "when", "so that", "even though"]


def words(block: str) -> list[str]:
    return block.split()


def plural(noun: str) -> str:
    if noun in IRREGULAR_PLURALS:
        return IRREGULAR_PLURALS[noun]
    if noun.endswith(("s", "x", "ch", "sh")):
        return noun + "es"
    if noun.endswith("y") and noun[-2] not in "aeiou":
        return noun[:-1] + "ies"
    return noun + "s"


def third_person(verb: str) -> str:
    return plural(verb) if verb not in IRREGULAR_PLURALS else verb + "s"


def past(verb: str) -> str:
    if verb in IRREGULAR_PAST:
        return IRREGULAR_PAST[verb]
    if verb in DOUBLING:
        return verb + verb[-1] + "ed"
    if verb.endswith("e"):
        return verb + "d"
    if verb.endswith("y") and verb[-2] not in "aeiou":
        return verb[:-1] + "ied"
    return verb + "ed"


def gerund(verb: str) -> str:
    if verb in DOUBLING:
        return verb + verb[-1] + "ing"
    if verb.endswith("e") and not verb.endswith(("ee", "ye")):
        return verb[:-1] + "ing"
    return verb + "ing"


def article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def sentence(
    rng: random.Random,
    nouns: list[str],
    verbs: list[str],
    adjectives: list[str],
    adverbs: list[str],
    names: list[str],
    places: list[str],
) -> str:
    noun, other = rng.choice(nouns), rng.choice(nouns)
    adjective, verb, adverb = rng.choice(adjectives), rng.choice(verbs), rng.choice(adverbs)
    name, place, prep = rng.choice(names), rng.choice(places), rng.choice(PREPOSITIONS)
    shape = rng.randrange(9)
    if shape == 0:
        return f"The {adjective} {noun} {third_person(verb)} {adverb} {prep} the {plural(other)}."
    if shape == 1:
        return f"{name} {past(verb)} {article(adjective)} {adjective} {other} in {place} on {rng.choice(DAYS)}."
    if shape == 2:
        return (
            f"{rng.choice(COUNTS).capitalize()} {plural(noun)} were {gerund(verb)} {prep} the {other} "
            f"{rng.choice(CONNECTIVES)} {name} {past(rng.choice(verbs))} {adverb}."
        )
    if shape == 3:
        does = third_person(rng.choice(verbs))
        return f"Why does the {noun} {verb} {adverb}? Ask {name}, who {does} {plural(other)}."
    if shape == 4:
        day, month, year = rng.randint(1, 28), rng.choice(MONTHS), rng.randint(1800, 2099)
        return f"On {day} {month} {year}, {name} reached {place} with {rng.randint(2, 999)} {plural(noun)}."
    if shape == 5:
        return f'"{gerund(verb).capitalize()} {plural(noun)} is {adjective} work," said {name}, {adverb}.'
    if shape == 6:
        price = rng.randint(1, 99999)
        unit = rng.choice(["hour", "token", "block", "day"])
        return f"{article(noun).capitalize()} {noun} costs {price} credits per {unit}; the {other} is {adjective}."
    if shape == 7:
        return f"In {place}, {plural(noun)} and {plural(other)} are {adverb} {adjective}."
    return f"Let {name} {verb} the {adjective} {noun}, then {rng.choice(verbs)} it {prep} the {other}."


def generate(sentences: int = 3600, seed: int = 2026) -> str:
    rng = random.Random(seed)
    lists = (words(NOUNS), words(VERBS), words(ADJECTIVES), words(ADVERBS), words(NAMES), words(PLACES))
    lines = [PROSE, CODE]
    paragraph: list[str] = []
    for _ in range(sentences):
        paragraph.append(sentence(rng, *lists))
        if len(paragraph) >= rng.randint(3, 7):
            lines.append(" ".join(paragraph))
            paragraph = []
    if paragraph:
        lines.append(" ".join(paragraph))
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    Path(__file__).with_name("corpus.txt").write_text(generate())
