"""Probes against a real local swarm: an honest provider gets measured figures; one that
serves a tampered checkpoint (under a forged digest file, so it claims the right model) and
one that does not answer are degraded, and matching leaves them out."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
from safetensors.torch import load_file, save_file

from client_sdk.swarm.local import LocalSwarm
from hivemart_core.models import create_model, load_model_info
from hivemart_core.models.checkpoint import compute_digests, write_digest_file
from hivemart_core.protocol.identity import Identity
from hivemart_core.swarm.runtime import SwarmRuntime
from marketplace.catalog.services import catalog_model_create
from marketplace.jobs.models import Job
from marketplace.jobs.selectors import job_plan_current
from marketplace.providers.models import Provider
from marketplace.providers.services import provider_heartbeat
from scheduler import services
from scheduler.probing import ProbeTarget, References, ReferenceUnavailable, probe_provider
from tests.marketplace.factories import make_user, register
from tests.scheduler.factories import make_job

pytestmark = pytest.mark.swarm


def tamper(original: Path, target: Path) -> Path:
    """A copy of ``original`` with block 1's MLP changed, and a digest file forged to still
    claim the original's digests (and so its model id)."""
    shutil.copytree(original, target)
    weights = load_file(str(target / "model.safetensors"))
    weights["model.layers.1.mlp.down_proj.weight"] = weights["model.layers.1.mlp.down_proj.weight"] * -3.0
    save_file(weights, str(target / "model.safetensors"), metadata={"format": "pt"})
    write_digest_file(target, compute_digests(original))
    return target


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("probe-models")
    honest = create_model(root / "honest", arch="llama", hidden=64, layers=4, seed=0, heads=4, kv_heads=2)
    liar = tamper(honest, root / "liar")
    model_id = load_model_info(honest).model_id
    assert load_model_info(liar).model_id == model_id  # the forgery works: same claimed identity
    references = root / "references"
    references.mkdir()
    (references / model_id).symlink_to(honest)
    return {"honest": honest, "liar": liar, "references": references}


@pytest.fixture(scope="module")
def swarm(models: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalSwarm]:
    local = LocalSwarm(workdir=tmp_path_factory.mktemp("probe-swarm"))
    platform = Identity.load_or_create(local.workdir / "platform.key")
    try:
        local.start_bootstrap()
        local.start_agent(models["honest"], 0, 4, name="honest")
        local.start_agent(models["liar"], 0, 4, name="liar")
        # An honest provider selling through the marketplace: it computes only for ticketed requests.
        local.start_agent(models["honest"], 0, 4, name="paid", extra_args=["--platform-key", platform.public_key.hex()])
        yield local
    finally:
        local.stop()


@pytest.fixture(scope="module")
def runtime(swarm: LocalSwarm) -> Iterator[SwarmRuntime]:
    with SwarmRuntime(swarm.initial_peers) as rt:
        yield rt


def test_probe_of_an_honest_provider_is_all_correct(
    models: dict[str, Path], swarm: LocalSwarm, runtime: SwarmRuntime
) -> None:
    references = References(models["references"])
    model_id = load_model_info(models["honest"]).model_id
    honest = next(a for a in swarm.agents if a.name == "honest")
    result = probe_provider(
        runtime,
        ProbeTarget(honest.peer_id, model_id, 0, 4),
        references.get(model_id),
        tokens=8,
        requests=2,
        timeout=30,
        seed=1,
    )
    assert (result.correct, result.requests, result.errors) == (3, 3, ())
    assert result.throughput > 0 and result.latency_ms > 0
    # A registration that does not match what the agent serves is a wrong answer, not a crash.
    mismatch = probe_provider(
        runtime, ProbeTarget(honest.peer_id, "llama-4x64-000000000000", 0, 4), references.get(model_id), timeout=30
    )
    assert mismatch.correct == 0 and "serves" in mismatch.errors[0]
    with pytest.raises(ReferenceUnavailable):
        references.get("llama-4x64-000000000000")
    # A provider that sells through the marketplace answers an unticketed probe with an error.
    paid = next(a for a in swarm.agents if a.name == "paid")
    refused = probe_provider(runtime, ProbeTarget(paid.peer_id, model_id, 0, 4), references.get(model_id), timeout=30)
    assert refused.correct == 0 and "ticket" in refused.errors[0]


@pytest.mark.django_db
def test_probes_measure_honest_providers_and_degrade_liars_and_the_silent(
    models: dict[str, Path], swarm: LocalSwarm, runtime: SwarmRuntime, settings
) -> None:  # noqa: ANN001
    settings.HIVEMART_MODELS_DIR = models["references"]
    settings.HIVEMART_PLATFORM_KEY_FILE = swarm.workdir / "platform.key"  # the key the paid agent trusts
    settings.HIVEMART_PROBE_TIMEOUT_S = 5
    settings.HIVEMART_PROBE_TOKENS = 8
    info = load_model_info(models["honest"])
    digests = compute_digests(models["honest"])
    model = catalog_model_create(
        model_id=info.model_id,
        arch=info.arch,
        num_blocks=info.num_blocks,
        hidden_size=info.hidden_size,
        dtype="float32",
        weights_digest=digests["model"],
        block_digests=digests["blocks"],
    )
    user = make_user()
    providers = {}
    for name in ("honest", "liar", "silent", "paid"):
        identity = Identity.generate() if name == "silent" else Identity.load(swarm.workdir / f"{name}.key")
        provider = register(
            user=user,
            identity=identity,
            model=model,
            start=0,
            end=4,
            price={"honest": 500, "liar": 10, "silent": 1, "paid": 5_000}[name],
        )
        # All claim to be fast; only probes tell them apart.
        providers[name] = provider_heartbeat(provider=provider, state="online", throughput=1e6, latency_ms=1.0)

    summary = services.providers_probe(runtime=runtime)

    ids = {name: p.pk for name, p in providers.items()}
    assert sorted(summary["probed"]) == sorted(ids.values()) and summary["skipped"] == []
    assert sorted(summary["degraded"]) == sorted([ids["liar"], ids["silent"]])
    measured = {name: Provider.objects.get(pk=pk).latest_measurement for name, pk in ids.items()}
    assert measured["honest"].success_rate == 1.0 and measured["honest"].throughput > 0
    # Probes carry platform-signed tickets, so a provider that requires them is measured too.
    assert measured["paid"].success_rate == 1.0 and measured["paid"].throughput > 0
    # Only the 1-block latency probe (block 0, untouched) was right; both span forwards were wrong.
    assert measured["liar"].success_rate == pytest.approx(1 / 3)
    assert measured["silent"].success_rate == 0.0 and measured["silent"].throughput == 0.0
    assert services.provider_is_degraded(Provider.objects.get(pk=ids["liar"]))
    # Wrong answers (not silence) are an offence: the liar's reputation falls, nobody else's.
    from marketplace.receipts.models import Offence

    assert [(o.provider_id, o.kind) for o in Offence.objects.all()] == [(ids["liar"], "probe")]
    assert Provider.objects.get(pk=ids["liar"]).reputation < 100
    assert Provider.objects.get(pk=ids["silent"]).reputation == 100

    # Matching now ignores the cheap liars and plans the honest provider.
    job = make_job(model=model, max_price=1_000)
    services.job_match(job_id=job.pk)
    job.refresh_from_db()
    assert job.state == Job.State.PLANNED
    plan = job_plan_current(job=job)
    assert [(s.provider_id, [b.provider_id for b in s.backups.all()]) for s in plan.segments.all()] == [
        (ids["honest"], [])
    ]
