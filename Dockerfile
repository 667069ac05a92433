# pii-vault container image: a release build on Debian bookworm, run as a
# non-root user.
#
#     docker build -t pii-vault .
#     docker run --rm pii-vault --help
#
# Configuration comes from the environment (DATABASE_URL, PII_VAULT_KMS_KEY_ID,
# PII_VAULT_QUEUE_URL, AWS_REGION, ...); see docker-compose.yml for a full
# local stack.

FROM rust:1-bookworm AS builder
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
# Migrations are compiled into the binary (sqlx::migrate!); the bench is
# declared in Cargo.toml, so cargo wants its file to exist.
COPY migrations migrations
COPY benches benches
COPY src src
RUN cargo build --release --locked --bin pii-vault

FROM debian:bookworm-slim
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --system --uid 10001 --user-group --create-home --home-dir /var/lib/pii-vault \
        --shell /usr/sbin/nologin pii-vault
COPY --from=builder /src/target/release/pii-vault /usr/local/bin/pii-vault
# Numeric, so that orchestrators can verify "runs as non-root".
USER 10001:10001
WORKDIR /var/lib/pii-vault
ENTRYPOINT ["/usr/local/bin/pii-vault"]
CMD ["--help"]
