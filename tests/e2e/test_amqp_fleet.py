"""A control plane with the RabbitMQ link, real opsplane agents on it, and a gRPC agent beside
them in the same tasks. Real broker, real processes."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import pytest

from tests.e2e.fleet import Fleet, wait_for
from tests.rabbitmq import PrivateVhost, private_vhost

pytestmark = [pytest.mark.service("rabbitmq"), pytest.mark.service("rabbitmqctl")]
AMQP_URL = "amqp://guest:guest@127.0.0.1:5672/"


class AmqpFleet(Fleet):
    suffix: str = ""
    # A vhost of this module's own: the broker is shared, and its connections are the only
    # ones the broker-loss test may close.
    vhost: PrivateVhost | None = None

    @property
    def amqp_url(self) -> str:
        return self.vhost.url if self.vhost is not None else AMQP_URL

    def name(self, base: str) -> str:
        return f"{base}-{self.suffix}"

    def start_mq_agent(self, base: str, group: str) -> None:
        self.start_amqp_agent(self.name(base), self.amqp_url, self.name(group))


@pytest.fixture(scope="module")
def mq(tmp_path_factory: pytest.TempPathFactory) -> Iterator[AmqpFleet]:
    with private_vhost("opsplane-e2e") as vhost:
        yield from _mq(tmp_path_factory, vhost)


def _mq(tmp_path_factory: pytest.TempPathFactory, vhost: PrivateVhost) -> Iterator[AmqpFleet]:
    fleet = AmqpFleet(tmp_path_factory.mktemp("amqp-fleet"))
    fleet.vhost = vhost
    fleet.suffix = uuid.uuid4().hex[:6]
    # The broker-loss test cuts every connection: under load, agents may take several seconds
    # to come back, and 3 s of grace would give their runs up as lost before they report.
    fleet.server_env["OPSPLANE_LOST_GRACE"] = "60"
    try:
        fleet.start_server("--amqp-url", fleet.amqp_url)
        fleet.start_mq_agent("mq-1", "web")
        fleet.start_mq_agent("mq-2", "web")
        fleet.start_agent(fleet.name("grpc-1"), fleet.name("web"))
        fleet.wait_online(fleet.name("mq-1"), fleet.name("mq-2"), fleet.name("grpc-1"), timeout=30)
        yield fleet
    finally:
        fleet.stop()


def test_one_task_spans_rabbitmq_and_grpc_agents(mq: AmqpFleet) -> None:
    task = mq.create_task("echo hi from $(pwd | xargs basename)", groups=[mq.name("web")])
    done = mq.wait_task_done(task["id"])
    runs = mq.runs(task["id"])
    assert done["status"] == "succeeded", runs
    for base in ("mq-1", "mq-2", "grpc-1"):
        host = mq.name(base)
        assert runs[host]["stdout"] == f"hi from {host}\n"
    assert mq.host(mq.name("mq-1"))["link"] == "amqp"  # type: ignore[index]
    assert mq.host(mq.name("grpc-1"))["link"] == "grpc"  # type: ignore[index]


def test_output_streams_live_and_failures_are_per_host(mq: AmqpFleet) -> None:
    (mq.root / "work" / mq.name("mq-2") / "code").write_text("7")
    (mq.root / "work" / mq.name("mq-1") / "code").write_text("0")
    task = mq.create_task("echo start; exit $(cat code)", hosts=[mq.name("mq-1"), mq.name("mq-2")])
    done = mq.wait_task_done(task["id"])
    runs = mq.runs(task["id"])
    assert done["status"] == "failed"
    assert (runs[mq.name("mq-1")]["status"], runs[mq.name("mq-2")]["exit_code"]) == ("succeeded", 7)
    with mq.client() as client:
        log = client.get(f"/api/v1/tasks/{task['id']}/runs/{runs[mq.name('mq-2')]['id']}/log").text
    assert log == "start\n"


def test_broker_connections_killed_mid_run_lose_nothing_and_run_nothing_twice(
    mq: AmqpFleet,
) -> None:
    host = mq.name("mq-1")
    counter = mq.root / "work" / host / "executions"
    task = mq.create_task("echo x >> executions; sleep 3; echo finished", hosts=[host])
    wait_for(lambda: mq.runs(task["id"])[host]["status"] == "running", 15, "run started")
    # Every connection of this fleet (its vhost), and only those: the broker is shared.
    assert mq.vhost is not None
    assert mq.vhost.close_connections("opsplane test: broker connection loss") >= 3
    done = mq.wait_task_done(task["id"], timeout=60)
    run = mq.runs(task["id"])[host]
    assert (done["status"], run["status"], run["stdout"]) == (
        "succeeded",
        "succeeded",
        "finished\n",
    )
    assert counter.read_text() == "x\n"
    # Both sides reconnected by themselves: a new task still works.
    mq.wait_online(host, timeout=30)
    again = mq.create_task("true", hosts=[host])
    assert mq.wait_task_done(again["id"], timeout=30)["status"] == "succeeded"


def test_stopped_rabbitmq_agent_is_undeliverable(mq: AmqpFleet) -> None:
    host = mq.name("mq-2")
    mq.stop_agent(host)
    task = mq.create_task("true", hosts=[host])
    done = mq.wait_task_done(task["id"])
    run = mq.runs(task["id"])[host]
    assert (done["status"], run["status"]) == ("failed", "undeliverable")
