"""Database-enforced balance of every ledger transaction.

The services write a transaction's postings first and its header row last (the foreign key
from posting to transaction is deferred to commit on both databases). Triggers then make
the database refuse what an unbalanced transaction would need:

On both PostgreSQL and SQLite
- ``ledger_transaction_balanced``: inserting a header whose postings number fewer than two
  or do not sum to zero fails;
- ``ledger_posting_closed``: adding a posting to a transaction whose header exists fails;
- ``ledger_posting_immutable``: updating a posting fails (corrections are new transactions).
  So a committed transaction is balanced: its postings were all there, summing to zero, when
  its header was written, and none was added or changed since; and a posting cannot commit
  without a header (the foreign key).

On PostgreSQL only
- ``ledger_posting_balanced`` (a deferred constraint trigger): at commit, every transaction
  whose postings were inserted, updated or deleted must still sum to zero. This also covers
  deleting postings, which the SQLite triggers leave to the application (Django's test flush
  on SQLite deletes table by table, so a delete guard there would break it); the admin
  offers no way to delete or edit ledger rows.
"""

from django.db import migrations

SQLITE_FORWARD = [
    """
    CREATE TRIGGER ledger_transaction_balanced BEFORE INSERT ON ledger_transaction
    WHEN (SELECT COUNT(*) FROM ledger_posting WHERE transaction_id = NEW.id) < 2
      OR (SELECT COALESCE(SUM(amount), 0) FROM ledger_posting WHERE transaction_id = NEW.id) != 0
    BEGIN
        SELECT RAISE(ABORT, 'ledger: unbalanced transaction (postings must number two or more and sum to zero)');
    END
    """,
    """
    CREATE TRIGGER ledger_posting_closed BEFORE INSERT ON ledger_posting
    WHEN EXISTS (SELECT 1 FROM ledger_transaction WHERE id = NEW.transaction_id)
    BEGIN
        SELECT RAISE(ABORT, 'ledger: postings cannot be added to a recorded transaction');
    END
    """,
    """
    CREATE TRIGGER ledger_posting_immutable BEFORE UPDATE ON ledger_posting
    BEGIN
        SELECT RAISE(ABORT, 'ledger: postings are immutable');
    END
    """,
]
SQLITE_BACKWARD = [
    "DROP TRIGGER IF EXISTS ledger_transaction_balanced",
    "DROP TRIGGER IF EXISTS ledger_posting_closed",
    "DROP TRIGGER IF EXISTS ledger_posting_immutable",
]

POSTGRES_FORWARD = [
    """
    CREATE FUNCTION ledger_transaction_balanced() RETURNS trigger LANGUAGE plpgsql AS $$
    DECLARE
        total numeric;
        n integer;
    BEGIN
        SELECT COALESCE(SUM(amount), 0), COUNT(*) INTO total, n FROM ledger_posting WHERE transaction_id = NEW.id;
        IF n < 2 OR total <> 0 THEN
            RAISE EXCEPTION 'ledger: unbalanced transaction % (% postings summing to %)', NEW.id, n, total
                USING ERRCODE = 'check_violation';
        END IF;
        RETURN NEW;
    END
    $$
    """,
    """
    CREATE TRIGGER ledger_transaction_balanced BEFORE INSERT ON ledger_transaction
    FOR EACH ROW EXECUTE FUNCTION ledger_transaction_balanced()
    """,
    """
    CREATE FUNCTION ledger_posting_guard() RETURNS trigger LANGUAGE plpgsql AS $$
    BEGIN
        IF TG_OP = 'UPDATE' THEN
            RAISE EXCEPTION 'ledger: postings are immutable' USING ERRCODE = 'check_violation';
        END IF;
        IF EXISTS (SELECT 1 FROM ledger_transaction WHERE id = NEW.transaction_id) THEN
            RAISE EXCEPTION 'ledger: postings cannot be added to a recorded transaction'
                USING ERRCODE = 'check_violation';
        END IF;
        RETURN NEW;
    END
    $$
    """,
    """
    CREATE TRIGGER ledger_posting_closed BEFORE INSERT ON ledger_posting
    FOR EACH ROW EXECUTE FUNCTION ledger_posting_guard()
    """,
    """
    CREATE TRIGGER ledger_posting_immutable BEFORE UPDATE ON ledger_posting
    FOR EACH ROW EXECUTE FUNCTION ledger_posting_guard()
    """,
    """
    CREATE FUNCTION ledger_posting_balanced() RETURNS trigger LANGUAGE plpgsql AS $$
    DECLARE
        tx uuid;
        total numeric;
    BEGIN
        IF TG_OP = 'DELETE' THEN tx := OLD.transaction_id; ELSE tx := NEW.transaction_id; END IF;
        SELECT COALESCE(SUM(amount), 0) INTO total FROM ledger_posting WHERE transaction_id = tx;
        IF total <> 0 THEN
            RAISE EXCEPTION 'ledger: transaction % does not balance at commit (sum %)', tx, total
                USING ERRCODE = 'check_violation';
        END IF;
        RETURN NULL;
    END
    $$
    """,
    """
    CREATE CONSTRAINT TRIGGER ledger_posting_balanced AFTER INSERT OR UPDATE OR DELETE ON ledger_posting
    DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION ledger_posting_balanced()
    """,
]
POSTGRES_BACKWARD = [
    "DROP TRIGGER IF EXISTS ledger_posting_balanced ON ledger_posting",
    "DROP TRIGGER IF EXISTS ledger_posting_immutable ON ledger_posting",
    "DROP TRIGGER IF EXISTS ledger_posting_closed ON ledger_posting",
    "DROP TRIGGER IF EXISTS ledger_transaction_balanced ON ledger_transaction",
    "DROP FUNCTION IF EXISTS ledger_posting_balanced()",
    "DROP FUNCTION IF EXISTS ledger_posting_guard()",
    "DROP FUNCTION IF EXISTS ledger_transaction_balanced()",
]

STATEMENTS = {
    "sqlite": (SQLITE_FORWARD, SQLITE_BACKWARD),
    "postgresql": (POSTGRES_FORWARD, POSTGRES_BACKWARD),
}


def _run(schema_editor, forward: bool) -> None:  # noqa: ANN001 - Django's migration signature
    vendor = schema_editor.connection.vendor
    if vendor not in STATEMENTS:
        raise RuntimeError(f"the ledger's balance triggers are written for PostgreSQL and SQLite, not {vendor}")
    for statement in STATEMENTS[vendor][0 if forward else 1]:
        schema_editor.execute(statement, params=None)


def forwards(apps, schema_editor) -> None:  # noqa: ANN001
    _run(schema_editor, forward=True)


def backwards(apps, schema_editor) -> None:  # noqa: ANN001
    _run(schema_editor, forward=False)


class Migration(migrations.Migration):
    dependencies = [("ledger", "0001_initial")]
    operations = [migrations.RunPython(forwards, backwards, elidable=False)]
