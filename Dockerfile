# syntax=docker/dockerfile:1
# vastshift: build with the same cargo invocation CI uses, run as a non-root user on a slim base.

FROM rust:1-bookworm AS builder
WORKDIR /src
# Dependencies first, so source edits don't rebuild them.
COPY Cargo.toml Cargo.lock ./
RUN mkdir src \
    && echo 'fn main() {}' > src/main.rs \
    && echo '' > src/lib.rs \
    && mkdir config && touch config/demo.toml \
    && cargo build --release --locked \
    && rm -rf src config
COPY src ./src
COPY config ./config
RUN touch src/main.rs src/lib.rs && cargo build --release --locked

FROM debian:bookworm-slim AS runtime
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --system --uid 10001 --home-dir /var/lib/vastshift --shell /usr/sbin/nologin vastshift \
    && mkdir -p /var/lib/vastshift /etc/vastshift \
    && chown vastshift /var/lib/vastshift
COPY --from=builder /src/target/release/vastshift /usr/local/bin/vastshift
COPY config/ /etc/vastshift/
ENV VASTSHIFT_CONFIG=/etc/vastshift/container.toml
# The state file (overrides, rollback latch, audit) must survive restarts.
VOLUME ["/var/lib/vastshift"]
USER 10001
EXPOSE 8080 9901
STOPSIGNAL SIGTERM
HEALTHCHECK --interval=10s --timeout=3s --start-period=5s --retries=3 CMD ["vastshift", "healthcheck"]
ENTRYPOINT ["vastshift"]
CMD ["serve"]
