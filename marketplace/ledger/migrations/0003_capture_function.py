"""``ledger_capture()``: a hold capture as one PostgreSQL statement.

Captures are the ledger's hot path (every accepted work receipt is one), and done through
the ORM a capture costs a dozen round trips and most of its time in Python. On PostgreSQL
``marketplace.ledger.services.hold_capture`` therefore calls this function, which does
exactly what the Python implementation (``_hold_capture_orm``, used on SQLite) does, in the
same order and under the same locks:

1. lock the hold row; replay or refuse a reused idempotency key; refuse a closed hold or a
   capture larger than what is left in its escrow;
2. write the postings, then the header (the balance triggers of migration 0002 check them);
3. update balances in lock order: escrow, then the payee's earnings, then the shared fees
   account last, so that its row lock is held as briefly as possible.

Refusals raise SQLSTATEs that the service maps back onto its ApplicationErrors:
``HM001`` insufficient (DETAIL: what is left), ``HM002`` hold closed, ``HM003`` idempotency
key reused for another movement, ``HM004`` no such hold. The parity of the two
implementations is tested on PostgreSQL (tests/marketplace/test_ledger.py).
"""

from django.db import migrations

CREATE = r"""
CREATE FUNCTION ledger_capture(p_hold bigint, p_amount bigint, p_payee bigint, p_fee_bps integer,
                               p_key text, p_memo text)
RETURNS TABLE (transaction_id uuid, created_at timestamptz, replayed boolean)
LANGUAGE plpgsql AS $$
DECLARE
    v_state text;
    v_escrow bigint;
    v_left bigint;
    v_fee bigint := p_amount * p_fee_bps / 10000;  -- both non-negative: integer division rounds down
    v_fees bigint;
    v_prev uuid;
    v_prev_kind text;
    v_prev_at timestamptz;
    v_prev_legs text[];
    v_want_legs text[];
    v_now timestamptz := now();
    v_tx uuid := gen_random_uuid();
BEGIN
    SELECT h.state, h.escrow_id INTO v_state, v_escrow FROM ledger_hold h WHERE h.id = p_hold FOR UPDATE;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'no hold %', p_hold USING ERRCODE = 'HM004';
    END IF;

    IF v_fee > 0 THEN
        SELECT a.id INTO v_fees FROM ledger_account a WHERE a.kind = 'fees';
        IF NOT FOUND THEN
            INSERT INTO ledger_account (kind, user_id, label, balance, created_at)
            VALUES ('fees', NULL, 'platform fees', 0, v_now) ON CONFLICT DO NOTHING;
            SELECT a.id INTO v_fees FROM ledger_account a WHERE a.kind = 'fees';
        END IF;
    END IF;

    SELECT t.id, t.kind, t.created_at INTO v_prev, v_prev_kind, v_prev_at
    FROM ledger_transaction t WHERE t.idempotency_key = p_key;
    IF FOUND THEN
        SELECT array_agg(p.account_id::text || ':' || p.amount::text ORDER BY p.account_id) INTO v_prev_legs
        FROM ledger_posting p WHERE p.transaction_id = v_prev;
        SELECT array_agg(x.account_id::text || ':' || x.amount::text ORDER BY x.account_id) INTO v_want_legs
        FROM (VALUES (v_escrow, -p_amount), (p_payee, p_amount - v_fee), (v_fees, v_fee)) AS x (account_id, amount)
        WHERE x.amount <> 0;
        IF v_prev_kind = 'capture' AND v_prev_legs = v_want_legs THEN
            RETURN QUERY SELECT v_prev, v_prev_at, true;
            RETURN;
        END IF;
        RAISE EXCEPTION 'idempotency key % was used for a different ledger movement', p_key
            USING ERRCODE = 'HM003', DETAIL = v_prev::text;
    END IF;

    IF v_state <> 'open' THEN
        RAISE EXCEPTION 'hold #% is closed', p_hold USING ERRCODE = 'HM002';
    END IF;
    SELECT a.balance INTO v_left FROM ledger_account a WHERE a.id = v_escrow;
    IF p_amount > v_left THEN
        RAISE EXCEPTION 'hold #% has % micro-credits left, % asked', p_hold, v_left, p_amount
            USING ERRCODE = 'HM001', DETAIL = v_left::text;
    END IF;

    INSERT INTO ledger_posting (transaction_id, account_id, amount)
    SELECT v_tx, x.account_id, x.amount
    FROM (VALUES (v_escrow, -p_amount), (p_payee, p_amount - v_fee), (v_fees, v_fee)) AS x (account_id, amount)
    WHERE x.amount <> 0;
    INSERT INTO ledger_transaction (id, kind, idempotency_key, hold_id, memo, created_by_id, created_at)
    VALUES (v_tx, 'capture', p_key, p_hold, p_memo, NULL, v_now);

    UPDATE ledger_account SET balance = balance - p_amount WHERE id = v_escrow;
    IF p_amount - v_fee <> 0 THEN
        UPDATE ledger_account SET balance = balance + (p_amount - v_fee) WHERE id = p_payee;
    END IF;
    IF v_fee > 0 THEN
        UPDATE ledger_account SET balance = balance + v_fee WHERE id = v_fees;
    END IF;
    RETURN QUERY SELECT v_tx, v_now, false;
END
$$
"""

DROP = "DROP FUNCTION IF EXISTS ledger_capture(bigint, bigint, bigint, integer, text, text)"


def forwards(apps, schema_editor) -> None:  # noqa: ANN001 - Django's migration signature
    if schema_editor.connection.vendor == "postgresql":
        schema_editor.execute(CREATE, params=None)


def backwards(apps, schema_editor) -> None:  # noqa: ANN001
    if schema_editor.connection.vendor == "postgresql":
        schema_editor.execute(DROP, params=None)


class Migration(migrations.Migration):
    dependencies = [("ledger", "0002_balanced_transactions")]
    operations = [migrations.RunPython(forwards, backwards, elidable=False)]
