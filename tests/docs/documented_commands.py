"""How each command in README.md and docs/ is checked (``tests/docs/commands.py`` finds them;
``tests/docs/test_documented_commands.py`` keeps this list and the docs in agreement).

- ``RUN``: run as written, in the order the docs give them, against a kept ``hivemart demo``
  (``tests/demo/test_documented_commands.py``); the only change is the placeholders below,
  replaced by that demo's values.
- ``DEMO``: it is ``hivemart demo`` itself: the stack those commands run against.
- ``HELP``: not run, for the reason given; its program and subcommand exist and accept every
  option it uses (checked against the command's own parser).
- ``HOST``: host administration (docker, systemd, installing packages): not run, for the
  reason given; every repository file it names exists.
"""

from __future__ import annotations

RUN, DEMO, HELP, HOST = "run", "demo", "help", "host"

# Placeholders in RUN commands, replaced by the kept demo's values (whole words only).
PLACEHOLDERS = ("URL", "KEY", "MADDR", "MODEL_ID", "ID", "OUT")

_SERVICE = "a long-running service (tests/scheduler and tests/provider_agent run it)"
_GPU_MARKET = (
    "an example for a GPU machine selling to the example.org marketplace; the Sell page's command is run in tests/demo"
)
_BENCH = "a benchmark (it measures time); tests/bench runs each on a small scale"
_DOCKER = "needs docker, which test machines do not have; tests/deploy checks compose.yaml and the images"
_SYSTEMD = "administers a provider host (root, systemd); tests/deploy checks the unit files"
_INSTALL = "installs packages from an index; scripts/test and the CI run it"
_MONEY = "needs a provider with earnings and a staff key; tests/client_sdk/test_cli_money.py runs each"
_GATEWAY = "a long-running service (the OpenAI-compatible gateway); tests/serve runs it with the openai client"
_ADAPTER = "reference syntax; tests/swarm/test_adapter_inference.py runs generate --adapter on a PEFT LoRA"
_SYNTAX = "reference syntax ([optional] parts, placeholders); the same command runs in README's walkthrough"

COMMANDS: dict[str, tuple[str, str]] = {
    # README: quick start
    'python3 -m venv .venv && .venv/bin/pip install -c constraints.txt -e ".[all]" && .venv/bin/hivemart demo': (
        HOST,
        _INSTALL + "; the demo it runs is the kept demo",
    ),
    "./scripts/test": (HOST, "it is the test suite itself"),
    # README: the walkthrough against the kept demo
    "hivemart demo --keep": (DEMO, ""),
    "hivemart login --url URL --api-key KEY": (RUN, ""),
    "hivemart balance": (RUN, ""),
    "hivemart models list": (RUN, ""),
    'hivemart generate "Hello world" --model .hivemart/demo/models/demo-llama --initial-peers MADDR --paid '
    "--max-new-tokens 8": (RUN, ""),
    'printf \'{"text": "Providers serve the blocks and clients pay for verified work."}\\n\' > data.jsonl': (RUN, ""),
    "hivemart finetune --paid --data data.jsonl --model .hivemart/demo/models/demo-llama --initial-peers MADDR "
    "--steps 4 --batch-size 2 --seq-len 16": (RUN, ""),
    "hivemart jobs create --model MODEL_ID --kind inference --budget 5000000 --max-price 2000000": (RUN, ""),
    'hivemart generate "Hello world" --model .hivemart/demo/models/demo-llama --initial-peers MADDR --job ID '
    "--max-new-tokens 8": (RUN, ""),
    "hivemart jobs list": (RUN, ""),
    "hivemart jobs create": (HELP, "named in a sentence; it runs in the walkthrough"),
    # README: the command table
    "hivemart demo [--keep] [--json]": (DEMO, ""),
    'hivemart generate "PROMPT" --model PATH --initial-peers MADDR [--paid \\| --job ID] [--adapter DIR]': (
        HELP,
        _SYNTAX,
    ),
    "hivemart finetune --mode lora --data FILE.jsonl --model PATH --initial-peers MADDR [--paid \\| --job ID]": (
        HELP,
        _SYNTAX,
    ),
    "hivemart model create --arch llama --hidden 512 --layers 8 --seed 0 OUT": (RUN, ""),
    "hivemart-provider run": (HELP, "named in a sentence"),
    "hivemart-provider dht": (HELP, _SERVICE),
    "hivemart-provider run --model PATH --blocks 0:4 --initial-peers MADDR": (HELP, _SERVICE),
    "hivemart-provider run --model PATH --num-blocks 4 [--market URL --api-key K] [--rebalance-period 60]": (
        HELP,
        _SERVICE,
    ),
    "hivemart-provider run --model PATH --blocks 0:4 --market URL --api-key K --price 1000000": (HELP, _SERVICE),
    "hivemart-provider run --market URL --api-key K --model M": (HELP, _SERVICE),
    "hivemart-market migrate": (RUN, ""),
    "hivemart-market migrate --noinput": (RUN, ""),
    "hivemart-market worker --concurrency 2": (HELP, _SERVICE),
    "hivemart-market beat": (HELP, _SERVICE),
    "hivemart bench inference --json": (HELP, _BENCH),
    "hivemart bench failover --json": (HELP, _BENCH),
    "hivemart bench matching --json": (HELP, _BENCH),
    "hivemart bench ledger --json": (HELP, _BENCH),
    "hivemart bench chaos --json [--minutes N]": (HELP, _BENCH),
    "hivemart bench load --json [--clients 1,4,16,64]": (HELP, _BENCH),
    "hivemart bench load --json": (HELP, _BENCH),
    "hivemart bench swarm-sim --json [--providers 10000] [--blocks 80] [--hours 24] [--seed N]": (HELP, _BENCH),
    "hivemart bench train --json --jobs 2,4 [--load-steps 3]": (HELP, _BENCH),
    "hivemart bench train --json [--mode lora]": (HELP, _BENCH),
    "hivemart demo": (DEMO, ""),
    # LoRA adapters at inference (README, docs/generation.md)
    "hivemart finetune --mode lora --out DIR": (HELP, _ADAPTER),
    "hivemart finetune --out": (HELP, "named in a sentence; " + _ADAPTER),
    "hivemart generate --adapter DIR": (HELP, _ADAPTER),
    # The OpenAI-compatible gateway (README, docs/openai.md, docs/operators.md)
    "hivemart serve": (HELP, "named in a sentence"),
    "hivemart serve --model PATH --initial-peers MADDR [--market URL] [--adapter NAME=DIR] --host H --port P": (
        HELP,
        _GATEWAY,
    ),
    "hivemart serve --model ./llama-4x64 --initial-peers MADDR": (HELP, _GATEWAY),
    "hivemart serve --model ./llama-4x64 --initial-peers MADDR --adapter support=./support-lora": (
        HELP,
        _GATEWAY + "; tests/serve/test_adapters.py serves a PEFT LoRA so",
    ),
    "hivemart serve --model ./llama-4x64 --initial-peers /ip4/10.0.0.5/tcp/31337/p2p/QmPeer... "
    "--market https://market.example.org --host 0.0.0.0 --port 8080": (HELP, _GATEWAY),
    "hivemart serve --market http://web:8000 --host 0.0.0.0 --port 8080": (HELP, _GATEWAY),
    "pip install 'hivemart[serve]'": (HOST, _INSTALL),
    "export HIVEMART_GATEWAY_KEY=$(openssl rand -hex 24)": (
        HOST,
        "sets a shell variable for the gateway command below it",
    ),
    "hivemart bench serve --json": (HELP, _BENCH),
    'hivemart generate "Hello" --chat --model PATH --initial-peers MADDR': (
        HELP,
        "reference syntax; tests/swarm/test_generate_cli.py runs --chat against a swarm",
    ),
    "hivemart generate --paid": (HELP, "named in a sentence; it runs in README's walkthrough"),
    # Money in and out (README table, docs/operators.md, docs/providers.md)
    "hivemart wallet topup CREDITS": (
        HELP,
        _SYNTAX.replace("README's walkthrough", "tests/client_sdk/test_cli_money.py"),
    ),
    "hivemart payouts request --provider ID CREDITS": (HELP, _MONEY),
    "hivemart payouts list": (HELP, _MONEY),
    "hivemart payouts approve ID": (HELP, _MONEY),
    "hivemart payouts reject ID": (HELP, _MONEY),
    "hivemart payouts paid ID --reference REF": (HELP, _MONEY),
    # docs/providers.md: the market-wide providers
    "hivemart providers list": (RUN, ""),
    # docs/api.md, docs/operators.md
    "hivemart-market create_api_key": (HELP, "named in a sentence; it runs in operators.md's day-to-day block"),
    "hivemart-market createsuperuser": (HELP, "interactive (asks for a password)"),
    "hivemart-market create_api_key ops --create --staff": (RUN, ""),
    "hivemart-market grant_credits alice 5000000": (RUN, ""),
    "hivemart-market verify_ledger": (RUN, ""),
    "hivemart-market check --deploy": (HELP, "tests/deploy runs it with the example env's production settings"),
    "hivemart-provider dht --host-maddrs /ip4/0.0.0.0/tcp/31337 --identity dht.key": (
        HELP,
        _SERVICE + "; its ready line in the log is tested in tests/docs/test_documented_commands.py",
    ),
    "cp deploy/hivemart.env.example deploy/hivemart.env": (HOST, "writes into the checkout; the file it copies exists"),
    "docker compose -f deploy/compose.yaml up -d": (HOST, _DOCKER),
    "docker compose -f deploy/compose.yaml up -d --build": (HOST, _DOCKER),
    "docker compose -f deploy/compose.yaml exec web hivemart-market createsuperuser": (HOST, _DOCKER),
    "docker compose -f deploy/compose.yaml logs dht": (
        HOST,
        _DOCKER + "; the dht command it shows the log of writes its multiaddrs there (tested here)",
    ),
    "docker compose up -d": (HOST, _DOCKER),
    "docker run --gpus all ...": (HOST, _DOCKER),
    # docs/providers.md
    "export HIVEMART_API_KEY=hm_...": (HOST, "sets the variable hivemart-provider reads (checked against its --help)"),
    ".venv/bin/hivemart-provider -v run --market https://market.example.org --model /srv/models/llama-3-8b "
    "--num-blocks 8 --price 1000 --device cuda --host-maddrs /ip4/0.0.0.0/tcp/31338 --announce-maddrs "
    "/ip4/203.0.113.7/tcp/31338 --initial-peers /dns4/market.example.org/tcp/31337/p2p/12D3KooW...": (
        HELP,
        _GPU_MARKET,
    ),
    "useradd --system --home-dir /var/lib/hivemart --create-home hivemart": (HOST, _SYSTEMD),
    'python3.11 -m venv /opt/hivemart/.venv && /opt/hivemart/.venv/bin/pip install -c constraints.txt ".[provider]"': (
        HOST,
        _INSTALL,
    ),
    "install -d -m 0750 /etc/hivemart": (HOST, _SYSTEMD),
    "install -m 0600 deploy/provider.env.example /etc/hivemart/provider.env": (HOST, _SYSTEMD),
    "cp deploy/systemd/hivemart-provider.service /etc/systemd/system/": (HOST, _SYSTEMD),
    "systemctl daemon-reload && systemctl enable --now hivemart-provider": (HOST, _SYSTEMD),
    "journalctl -u hivemart-provider -f": (HOST, _SYSTEMD),
    "journalctl -u hivemart-provider": (HOST, _SYSTEMD),
    "systemctl stop": (HOST, _SYSTEMD),
}
