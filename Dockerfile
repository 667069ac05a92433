# pii-vault container image: a release build on Debian 12 (bookworm), run as
# a non-root user.
#
#     docker build -t pii-vault .
#     docker run --rm pii-vault --help
#
# Configuration comes from the environment (DATABASE_URL, PII_VAULT_KMS_KEY_ID,
# PII_VAULT_QUEUE_URL, AWS_REGION, ...); see docker-compose.yml for a full
# local stack.
#
# Base images are pinned by tag (a Rust release, a Debian point release) so
# that a rebuild gets the same toolchain and system; bump them on purpose.
# Both are Debian 12, so the binary finds the glibc it was linked against.

FROM rust:1.95.0-bookworm AS builder
WORKDIR /src

# Dependencies first, in a layer of their own: built against a dummy crate,
# so that this layer is reused until Cargo.toml or Cargo.lock changes, and a
# source change rebuilds pii-vault alone (the AWS SDK takes minutes).
COPY Cargo.toml Cargo.lock ./
COPY .cargo .cargo
RUN mkdir -p src benches \
    && echo 'fn main() {}' > src/main.rs \
    && touch src/lib.rs \
    && echo 'fn main() {}' > benches/protect.rs \
    && cargo build --profile production --locked --bin pii-vault \
    && rm -rf src benches

# Then the crate itself. Migrations are compiled into the binary
# (sqlx::migrate!); the bench is declared in Cargo.toml, so cargo wants its
# file to exist. `touch` makes cargo rebuild over the dummy's artifacts even
# where the copied files are older than them.
# build.rs lists migrations/postgres/functions for the binary and stamps
# the commit.
COPY build.rs build.rs
COPY migrations migrations
COPY benches benches
COPY src src
# The commit for `--version` and pii_vault_build_info (the build context has
# no .git): `docker build --build-arg PII_VAULT_COMMIT=$(git rev-parse --short HEAD)`.
# Without it, "unknown".
ARG PII_VAULT_COMMIT
RUN touch src/main.rs src/lib.rs \
    && cargo build --profile production --locked --bin pii-vault

FROM debian:12.12-slim
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --system --uid 10001 --user-group --create-home --home-dir /var/lib/pii-vault \
        --shell /usr/sbin/nologin pii-vault
COPY --from=builder /src/target/production/pii-vault /usr/local/bin/pii-vault
# Numeric, so that orchestrators can verify "runs as non-root".
USER 10001:10001
WORKDIR /var/lib/pii-vault
# `run --metrics-addr 0.0.0.0:9187`: /metrics, /healthz, /readyz.
EXPOSE 9187
ENTRYPOINT ["/usr/local/bin/pii-vault"]
CMD ["--help"]
