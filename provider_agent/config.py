"""Configuration of a provider agent. The CLI maps flags and ``HIVEMART_*`` variables onto it."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class AgentConfig:
    # Checkpoint directory of the model to serve (a Hugging Face save_pretrained directory).
    model_path: Path
    # Blocks to serve, as a half-open range [start, end); None asks the swarm where we are needed.
    blocks: tuple[int, int] | None = None
    # How many blocks to serve when `blocks` is None.
    num_blocks: int | None = None
    # Multiaddrs of peers already in the swarm (a bootstrap DHT node, usually).
    initial_peers: list[str] = field(default_factory=list)
    # libp2p private key file; created on first run. Its Ed25519 key also signs records.
    identity_path: Path | None = None
    # Multiaddrs the p2p daemon listens on; the default picks a free loopback port.
    host_maddrs: list[str] = field(default_factory=lambda: ["/ip4/127.0.0.1/tcp/0"])
    # Addresses to announce to others when they differ from the listening ones (NAT, docker).
    announce_maddrs: list[str] = field(default_factory=list)
    # torch device and dtype the blocks run in ("auto" = the checkpoint's dtype on CPU, fp16 on CUDA).
    device: str = "cpu"
    dtype: str = "auto"
    # Threads torch may use for computation; 0 picks them from the block size on CPU
    # (provider_agent.threads.auto_threads) and leaves torch's default on CUDA.
    torch_threads: int = 0
    # Longest sequence one inference session may hold, in tokens.
    max_session_length: int = 2048
    # Largest batch of one request.
    max_batch_size: int = 64
    # Most tokens (batch x sequence) one forward or backward request may carry.
    max_request_tokens: int = 16384
    # Open inference sessions allowed at once.
    max_sessions: int = 64
    # Run the decode steps of concurrent sessions on the same blocks as one batched forward
    # (provider_agent.server.batching), at most this many sessions a forward.
    batching: bool = True
    batch_max_sessions: int = 64
    # Longest a decode step waits for the other active sessions' steps to join its forward
    # (a lone session never waits).
    batch_window: float = 0.001
    # Bytes of KV cache all sessions together may hold.
    cache_bytes: int = 512 * 1024 * 1024
    # Seconds an inference session may stay idle before it is closed and its cache freed.
    session_idle_timeout: float = 300.0
    # Per-peer quotas (provider_agent.limits): what one peer may hold at once. Sessions and
    # their KV cache (None: a quarter of `cache_bytes`).
    max_sessions_per_peer: int = 16
    peer_cache_bytes: int | None = None
    # Streams one peer may keep open at once (each costs a file descriptor here and in p2pd).
    max_streams_per_peer: int = 128
    # Bytes of request tensors buffered while they arrive: per peer, and all peers together.
    peer_buffer_bytes: int = 1024 * 1024 * 1024
    buffer_bytes: int = 4096 * 1024 * 1024
    # Seconds a new stream may take to send its first message, and a message that has begun
    # may go without new bytes, before the stream is closed.
    stream_idle_timeout: float = 30.0
    # Bytes of LoRA adapters that fine-tuning jobs may keep here, all jobs together.
    adapter_bytes: int = 256 * 1024 * 1024
    # Largest LoRA rank a job may ask for.
    max_adapter_rank: int = 64
    # Seconds an adapter may stay unused before it is forgotten (each use refreshes it).
    adapter_ttl: float = 600.0
    # Bytes of activations that training forwards may keep for their backwards (which then
    # need not recompute the forward), and for how many seconds at most.
    graph_bytes: int = 512 * 1024 * 1024
    graph_ttl: float = 60.0
    # Seconds between DHT announcements; records expire after `announce_ttl`.
    announce_period: float = 10.0
    announce_ttl: float = 30.0
    # Marketplace base URL; without --blocks the agent asks it where it is needed (else the DHT).
    market_url: str | None = None
    # API key for the marketplace (HIVEMART_API_KEY): registers the provider, heartbeats,
    # uploads receipts. The marketplace pays its user.
    api_key: str | None = None
    # Hex Ed25519 public key of the marketplace that signs job tickets. With it (or with
    # `market_url`, which serves it) the agent requires a valid ticket on every billable RPC;
    # with neither it serves for free (local swarms, benchmarks).
    platform_key: str | None = None
    # Price of the offer registered with the marketplace: micro-credits per million work units.
    price: int = 1000
    # Send a receipt on an inference stream after every this many steps (and at its close).
    receipt_every: int = 8
    # Seconds between heartbeats to the marketplace, and between receipt uploads.
    heartbeat_period: float = 15.0
    upload_period: float = 5.0
    # Seconds between checks whether moving to another span would raise the swarm's weakest
    # block throughput by more than `rebalance_factor`; 0 never moves (always with --blocks).
    rebalance_period: float = 0.0
    rebalance_factor: float = 1 / 0.75
    # Seconds to let active sessions finish before moving; clients fail over the rest exactly.
    drain_timeout: float = 60.0
    # Throughput to announce (tokens/s through one block); None measures it at start-up.
    throughput: float | None = None
    # Where to print the ready line (multiaddrs) for scripts that start agents; None for stdout.
    ready_file: Path | None = None
