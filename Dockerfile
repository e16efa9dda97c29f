# syntax=docker/dockerfile:1
# The server image: multi-stage, dependencies built in their own cached layer, a non-root user,
# a health check with the binary itself (no shell or curl in the image).
#
#   docker build -t triggers .
#   docker buildx build --platform linux/amd64,linux/arm64 -t triggers .   # both architectures
#   docker run -e DATABASE_URL=postgres://user:pass@host:5432/triggers -p 8080:8080 -p 9090:9090 triggers
#
# Each platform is built natively in its own build stage (under QEMU when buildx emulates arm64,
# slow but exact); no cross toolchain is involved. `compose.yaml` runs it with PostgreSQL.
# Docker's default seccomp profile may block io_uring; the server then uses epoll by itself
# (--io-driver auto), which the test suite covers as well.
FROM rust:1.95-bookworm AS build
WORKDIR /src
# Dependencies first: this layer is rebuilt only when Cargo.toml or Cargo.lock change.
COPY Cargo.toml Cargo.lock ./
RUN mkdir -p src benches examples \
    && echo 'fn main() {}' > src/main.rs && touch src/lib.rs \
    && sed -i '/^\[\[bench\]\]/,/^$/d; /^\[\[example\]\]/,/^$/d' Cargo.toml \
    && cargo build --release --locked --bin triggers \
    && rm -rf src target/release/.fingerprint/triggers-* target/release/deps/triggers-* \
              target/release/deps/libtriggers-*
COPY Cargo.toml Cargo.lock ./
COPY src src
COPY migrations migrations
COPY benches benches
COPY examples examples
RUN cargo build --release --locked --bin triggers \
    && cp target/release/triggers /triggers

FROM debian:bookworm-slim
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates \
    && rm -rf /var/lib/apt/lists/*
COPY --from=build /triggers /usr/local/bin/triggers
USER 65534:65534
ENV TRIGGERS_LISTEN=0.0.0.0:8080 \
    TRIGGERS_METRICS_LISTEN=0.0.0.0:9090
EXPOSE 8080 9090
# Liveness, not readiness: a database blip must not get the container restarted.
HEALTHCHECK --interval=10s --timeout=3s --start-period=30s --retries=3 \
    CMD ["/usr/local/bin/triggers", "probe"]
# DATABASE_URL is required: docker run -e DATABASE_URL=postgres://user:pass@host/db ...
ENTRYPOINT ["/usr/local/bin/triggers"]
CMD ["serve"]
