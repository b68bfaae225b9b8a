"""The swarm: N simulated agents (up to 10,000) against a control plane, one command.

Each simulated agent speaks the real gRPC protocol on its own connection: it reads the
challenge, says a signed hello, waits for the welcome, sends signed heartbeats at the interval
the welcome gives, checks that every command is bound to it (its signed ``target`` and, for a
command signed once for a batch, its Merkle path to the signed root; the signature itself is not
checked, the swarm holds no control-plane key for gRPC), acks it, reports it started and its
signed result, and redials
with full-jitter backoff, honouring a RESOURCE_EXHAUSTED retry hint as a real agent does. In
``--mode reply`` it answers at once as if ``true`` had run; in ``--mode execute`` it runs the
command with the shell. Agents run many per process (asyncio) over ``--procs`` worker
processes (``bench/swarm/worker.py``), since one Python process cannot drive 10,000 streams
fast enough.

Usage (from the repository root)::

    python -m bench.swarm --agents 3000 [--procs 4] [--mode reply|execute] [--broadcasts 1]
        [--restart] [--json]
        # own control plane: `opsplane server` in a subprocess, SQLite in a temporary data
        # directory (or --database-url), require_enrollment=false, a bootstrap admin token;
        # --cp-env KEY=VALUE passes settings (e.g. OPSPLANE_CONNECT_LINGER=0.1)
    python -m bench.swarm --agents 3000 --grpc 127.0.0.1:50051 --api http://127.0.0.1:8000 \\
        --token TOKEN [--cp-pid PID]
        # attach to a running control plane (it must accept agents that never enrolled:
        # require_enrollment=false); --cp-pid lets the swarm report its CPU and memory

Phases, in order: connect (all N agents started at once, until the API's
``/api/v1/fleet/summary`` counts them online), ``--broadcasts`` times ``POST /api/v1/tasks``
of ``--command`` to the swarm's group (``--target all``: every host) until the task is
terminal, then with ``--restart`` the control plane is stopped and started again and the
connect phase is measured once more.

Output: a Markdown table, or with ``--json`` one JSON object (for ``bench/run``)::

    {"agents": N, "procs": P, "mode": "reply", "link": "grpc", "database": "sqlite",
     "enrollment": "...", "cp_rss_mib_before": MiB, "cp_rss_mib_after": MiB,
     "connect": {"online": n, "all_online_s": s|null,
                 "give_ups": n, "reconnects": n, "shed": n, "errors": {code: n},
                 "wall_s": s, "cp_cpu_pct": %, "cp_rss_mib": MiB,
                 "swarm_cpu_pct": %, "swarm_worker_max_cpu_pct": %},
     "broadcasts": [{"runs": n, "status": s, "post_s": s, "terminal_s": s|null,
                     "succeeded": n, "wall_s": ..., "cp_cpu_pct": ..., ...}],
     "restart": {same keys as connect} (with --restart),
     "swarm_bound": bool}

``--record FILE`` (gRPC): every simulated agent appends ``NAME RUN_ID ATTEMPT`` to FILE for each
command it receives, before acking it, so that a test counts executions on the hosts' side
(tests/e2e/test_deployment.py: none twice). A command whose stream ends before its result is
sent is abandoned and named in the agent's hellos for 10 minutes (``abandoned_run_ids``), as a
real agent names what a crashed predecessor left.

``give_ups``: agents that waited for the challenge or the welcome past 30 s and redialed;
``reconnects``: dials beyond one per agent; ``shed``: refusals with a retry hint; CPU % are
of one core over the phase; ``swarm_bound`` is true when a worker passed 90 % of a core (add
``--procs``). Exit status 0 when all agents got online, else 1.

RabbitMQ (``bench/swarm/amqp.py``): ``python -m bench.swarm --link amqp [--amqp-url URL]
[--amqp-connections 2] [--cp-key KEY] [--no-verify] [--heartbeat-interval 10] N`` runs N agents
of the RabbitMQ link (own queue, signed hello and heartbeats, signed started/result, the
control plane's signature checked with the key its data directory holds), multiplexed over
``--amqp-connections`` connections per worker; the control plane gets ``OPSPLANE_AMQP_URL``.
Attaching needs only ``--api`` and ``--token`` (and ``--cp-key`` to verify). ``report["swarm"]``
holds the workers' last counters, with ``duplicates``, ``refused``, ``cancels`` and
``unconfirmed`` on RabbitMQ.

Another link's agents: subclass :class:`bench.swarm.simulator.AgentSimulator` (as
``GrpcAgent`` and ``AmqpAgent`` do), count in :class:`SwarmStats`, and pick it in
``worker.py`` by ``--link``.
"""
