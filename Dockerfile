# syntax=docker/dockerfile:1
# vastshift container image.
#   docker build -t vastshift .
#   docker run -e VASTSHIFT_ADMIN_TOKEN=... -v $PWD/my.toml:/etc/vastshift/vastshift.toml:ro \
#     -v vastshift-state:/var/lib/vastshift -p 8080:8080 -p 9901:9901 vastshift
# The builder runs the same `cargo build --release --locked` as CI (.ci/run).

FROM rust:1-bookworm AS builder
WORKDIR /src
# Dependencies first, in their own layer: build them against a placeholder crate so that an
# edit under src/ only rebuilds vastshift itself, not the ~200 crates it depends on.
COPY Cargo.toml Cargo.lock ./
# How mimalloc is built (transparent huge pages off): .cargo/config.toml.
COPY .cargo ./.cargo
RUN mkdir src \
    && echo 'fn main() {}' > src/main.rs \
    && touch src/lib.rs \
    && cargo build --release --locked \
    && rm -rf src
COPY src ./src
# src/demo.rs embeds config/demo.toml (include_str!).
COPY config ./config
# COPY keeps the files' own mtimes, which can be older than the placeholder's build: touch the
# crate roots so cargo rebuilds vastshift for real.
RUN touch src/main.rs src/lib.rs && cargo build --release --locked

FROM debian:bookworm-slim AS runtime
# ca-certificates: the native root store for https upstreams (Vast.ai, console.vast.ai). Not
# version-pinned on purpose: it must follow Debian's security updates, and a pin breaks the
# build as soon as the archive moves on.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && groupadd --system --gid 10001 vastshift \
    && useradd --system --uid 10001 --gid 10001 --no-create-home \
         --home-dir /var/lib/vastshift --shell /usr/sbin/nologin vastshift \
    && mkdir -p /var/lib/vastshift /etc/vastshift \
    && chown 10001:10001 /var/lib/vastshift
COPY --from=builder /src/target/release/vastshift /usr/local/bin/vastshift
# The repo's example configs (vastshift.toml: every key with its default; demo.toml), then the
# container profile as the default file: both listeners on all interfaces (so vastshift refuses
# to start without VASTSHIFT_ADMIN_TOKEN) and the state file on the volume below. Mount your own
# file over /etc/vastshift/vastshift.toml, or a folder over /etc/vastshift (Kubernetes ConfigMap).
COPY config/ /etc/vastshift/
COPY config/container.toml /etc/vastshift/vastshift.toml
ENV VASTSHIFT_CONFIG=/etc/vastshift/vastshift.toml
# The state file (admin overrides, the rollback latch, ramp progress, the audit tail) must
# survive restarts, or a restart would undo a rollback.
VOLUME ["/var/lib/vastshift"]
USER 10001:10001
# 8080: the proxy. 9901: /health /ready /metrics and the token-protected /admin API.
EXPOSE 8080 9901
# SIGTERM: /ready turns 503, in-flight requests finish within server.shutdown_grace_secs.
STOPSIGNAL SIGTERM
# No curl in the image: the binary probes its own /health (default http://127.0.0.1:9901/health).
HEALTHCHECK --interval=10s --timeout=5s --start-period=10s --retries=3 CMD ["vastshift", "healthcheck"]
ENTRYPOINT ["vastshift"]
CMD ["serve"]
