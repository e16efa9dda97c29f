# The server image. The build step is the one CI and scripts/run.sh run:
#   cargo build --release --locked --bin triggers
# Docker's default seccomp profile may block io_uring; the server then uses epoll by itself
# (--io-driver auto), which the test suite covers as well.
FROM rust:1.95-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --release --locked --bin triggers

FROM debian:bookworm-slim
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates \
    && rm -rf /var/lib/apt/lists/*
COPY --from=build /src/target/release/triggers /usr/local/bin/triggers
USER 65534:65534
ENV TRIGGERS_LISTEN=0.0.0.0:8080 \
    TRIGGERS_METRICS_LISTEN=0.0.0.0:9090
EXPOSE 8080 9090
# DATABASE_URL is required: docker run -e DATABASE_URL=postgres://user:pass@host/db ...
ENTRYPOINT ["/usr/local/bin/triggers"]
CMD ["serve"]
