"""The gateway with ``--market``: each caller's key pays; a bad key is 401, an empty wallet 402,
and /v1/models prices a million tokens at the marketplace's cheapest offers."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest

from tests.serve.conftest import running

pytestmark = [pytest.mark.swarm, pytest.mark.django_db(transaction=True)]


@pytest.fixture
def market_gateway(served: Any, live_server: Any) -> Iterator[str]:
    from hivemart.serve.app import create_app
    from hivemart.serve.engine import MarketPayer

    payer = MarketPayer(live_server.url, budget=1_000_000, max_price=2_000_000, plan_timeout=2, price_ttl=0)
    with running(create_app(served, payer=payer, close_served=False)) as url:
        yield url


@pytest.fixture
def catalog_model(tiny_model: Path) -> Any:
    from hivemart_core.models import load_model_info
    from tests.marketplace.factories import make_model

    info = load_model_info(tiny_model)
    return make_model(model_id=info.model_id, num_blocks=info.num_blocks, hidden_size=info.hidden_size)


def user_key(credits: int) -> str:
    from marketplace.accounts.services import api_key_create
    from tests.marketplace.factories import make_wallet

    return api_key_create(user=make_wallet(credits=credits).user).raw


def test_a_bad_key_is_401(market_gateway: str, catalog_model: Any) -> None:
    client = openai.OpenAI(base_url=market_gateway, api_key="hm_not-a-real-key", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as caught:
        client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=2)
    assert caught.value.code == "invalid_api_key" and "Hivemart API key" in caught.value.message
    with pytest.raises(openai.AuthenticationError):
        client.models.list()


def test_an_empty_wallet_is_402_with_what_to_do(market_gateway: str, catalog_model: Any) -> None:
    client = openai.OpenAI(base_url=market_gateway, api_key=user_key(0), max_retries=0)
    for stream in (False, True):
        with pytest.raises(openai.APIStatusError) as caught:
            client.completions.create(model="tiny", prompt="hi", max_tokens=2, stream=stream)
        assert caught.value.status_code == 402 and caught.value.code == "insufficient_quota"
        assert "1000000 micro-credits" in caught.value.message and "credits" in caught.value.message


def test_models_show_the_price_per_million_tokens(market_gateway: str, catalog_model: Any) -> None:
    from tests.marketplace.factories import make_provider

    client = openai.OpenAI(base_url=market_gateway, api_key=user_key(0), max_retries=0)
    assert client.models.list().data[0].model_extra["hivemart"]["price_per_million_tokens"] is None  # no offers yet
    make_provider(model=catalog_model, start=0, end=2, price=1_000)
    make_provider(model=catalog_model, start=2, end=4, price=3_000)
    make_provider(model=catalog_model, start=0, end=4, price=5_000)
    card = client.models.list().data[0].model_extra["hivemart"]
    # Each block bought where it is cheapest: 2 blocks at 1000 and 2 at 3000 per million units.
    assert card["price_per_million_tokens"] == 8_000 and card["price_per_million_tokens_credits"] == "0.008000"


def test_a_request_nobody_plans_is_503_and_its_hold_comes_back(market_gateway: str, catalog_model: Any) -> None:
    from marketplace.jobs.models import Job
    from marketplace.ledger.services import wallet_get_or_create

    key = user_key(10_000_000)
    client = openai.OpenAI(base_url=market_gateway, api_key=key, max_retries=0)
    with pytest.raises(openai.APIStatusError) as caught:  # no scheduler runs here: the job is never planned
        client.completions.create(model="tiny", prompt="hi", max_tokens=2)
    assert caught.value.status_code == 503 and caught.value.code == "no_providers"
    job = Job.objects.get()
    assert job.state == "cancelled" and wallet_get_or_create(user=job.user).balance == 10_000_000
