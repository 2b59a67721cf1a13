"""``hivemart-market verify_ledger``: the books' check as operators and the demo run it."""

from __future__ import annotations

import json
from io import StringIO

import pytest
from django.core.management import call_command

from marketplace.accounts.services import user_create
from marketplace.ledger.services import credit_grant, wallet_get_or_create


@pytest.mark.django_db
def test_verify_ledger_reports_balances_by_kind() -> None:
    credit_grant(account=wallet_get_or_create(user=user_create(username="carol")), amount=1_234)
    out = StringIO()
    call_command("verify_ledger", "--json", stdout=out)
    report = json.loads(out.getvalue())
    assert report["consistent"] is True and report["postings_total"] == 0
    assert report["balances_by_kind"]["wallet"] == 1_234
    assert report["balances_by_kind"]["external"] == -1_234
    text = StringIO()
    call_command("verify_ledger", stdout=text)
    assert "consistent: True" in text.getvalue()
