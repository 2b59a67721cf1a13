"""``ledger_capture()`` takes the platform fee as an amount instead of basis points.

Settlement computes fees on cumulative amounts (docs/protocol.md, "Rounding"): the fee of
one capture is ``fee(total paid after) - fee(total paid before)``, which no per-capture
rate reproduces. The function is otherwise that of migration 0003; the fee is checked by
``marketplace.ledger.services.hold_capture`` (0 <= fee <= amount) before the call.
"""

import importlib

from django.db import migrations

DROP_OLD = "DROP FUNCTION IF EXISTS ledger_capture(bigint, bigint, bigint, integer, text, text)"
DROP_NEW = "DROP FUNCTION IF EXISTS ledger_capture(bigint, bigint, bigint, bigint, text, text)"
CREATE = r"""
CREATE FUNCTION ledger_capture(p_hold bigint, p_amount bigint, p_payee bigint, p_fee bigint,
                               p_key text, p_memo text)
RETURNS TABLE (transaction_id uuid, created_at timestamptz, replayed boolean)
LANGUAGE plpgsql AS $$
DECLARE
    v_state text;
    v_escrow bigint;
    v_left bigint;
    v_fee bigint := p_fee;  -- the caller's (ledger.services.fee_for, or settlement's cumulative fee)
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


def forwards(apps, schema_editor) -> None:  # noqa: ANN001 - Django's migration signature
    if schema_editor.connection.vendor == "postgresql":
        schema_editor.execute(DROP_OLD, params=None)
        schema_editor.execute(CREATE, params=None)


def backwards(apps, schema_editor) -> None:  # noqa: ANN001
    if schema_editor.connection.vendor == "postgresql":
        previous = importlib.import_module("marketplace.ledger.migrations.0003_capture_function")
        schema_editor.execute(DROP_NEW, params=None)
        schema_editor.execute(previous.CREATE, params=None)


class Migration(migrations.Migration):
    dependencies = [("ledger", "0004_alter_transaction_kind")]
    operations = [migrations.RunPython(forwards, backwards, elidable=False)]
