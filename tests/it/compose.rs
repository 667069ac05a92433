//! `docker-compose.yml` and the `Dockerfile`, checked against the binary
//! without a Docker engine: every variable the compose file sets for a
//! pii-vault container is one pii-vault reads, every command it runs parses,
//! each role runs under its own login, the KMS key outlives a LocalStack
//! restart, and the image exposes the worker's metrics port from pinned
//! base images.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::path::Path;

use clap::{CommandFactory, Parser};
use pii_vault::cli::Cli;
use serde_json::Value;

fn repo_file(name: &str) -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join(name);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// The compose file, merge keys (`<<: *anchor`) applied.
fn compose() -> Value {
    serde_saphyr::from_str(&repo_file("docker-compose.yml")).expect("docker-compose.yml parses")
}

fn services(compose: &Value) -> &serde_json::Map<String, Value> {
    compose["services"].as_object().expect("a services map")
}

/// The services that run the pii-vault image.
fn pii_vault_services(compose: &Value) -> Vec<(&str, &Value)> {
    let out: Vec<(&str, &Value)> = services(compose)
        .iter()
        .filter(|(_, s)| s.get("build").is_some() || s["image"] == "pii-vault:local")
        .map(|(n, s)| (n.as_str(), s))
        .collect();
    assert!(out.len() >= 3, "pii-vault services: {out:?}");
    out
}

/// A service's `environment`, as a map or as a list of `KEY=VALUE`.
fn environment(service: &Value) -> BTreeMap<String, String> {
    let scalar = |v: &Value| match v {
        Value::String(s) => s.clone(),
        Value::Null => String::new(),
        other => other.to_string(),
    };
    match &service["environment"] {
        Value::Object(m) => m.iter().map(|(k, v)| (k.clone(), scalar(v))).collect(),
        Value::Array(items) => items
            .iter()
            .map(|i| {
                let i = i.as_str().expect("KEY=VALUE");
                let (k, v) = i.split_once('=').unwrap_or((i, ""));
                (k.to_string(), v.to_string())
            })
            .collect(),
        Value::Null => BTreeMap::new(),
        other => panic!("environment: {other}"),
    }
}

/// A service's `command` as words (a list, or a string split on spaces as
/// compose does for strings without quotes).
fn command(service: &Value) -> Vec<String> {
    match &service["command"] {
        Value::Array(words) => words
            .iter()
            .map(|w| w.as_str().expect("a string").to_string())
            .collect(),
        Value::String(s) => {
            assert!(!s.contains(['"', '\'']), "quoted command string: {s}");
            s.split_whitespace().map(str::to_string).collect()
        }
        other => panic!("command: {other}"),
    }
}

/// Every environment variable `pii-vault` reads through clap: each
/// argument's `env`, over every subcommand.
fn clap_env_vars() -> BTreeSet<String> {
    fn walk(cmd: &clap::Command, out: &mut BTreeSet<String>) {
        for arg in cmd.get_arguments() {
            if let Some(env) = arg.get_env() {
                out.insert(env.to_string_lossy().into_owned());
            }
        }
        for sub in cmd.get_subcommands() {
            walk(sub, out);
        }
    }
    let mut out = BTreeSet::new();
    walk(&Cli::command(), &mut out);
    assert!(out.contains("DATABASE_URL") && out.contains("PII_VAULT_QUEUE_URL"));
    out
}

/// Read outside clap, and documented: the log filter, and the AWS SDK's
/// standard configuration (region, endpoints, credentials).
fn is_standard(var: &str) -> bool {
    var.starts_with("AWS_") || ["PII_VAULT_LOG", "RUST_LOG"].contains(&var)
}

#[test]
fn every_variable_set_for_pii_vault_is_one_it_reads() {
    let compose = compose();
    let known = clap_env_vars();
    for (name, service) in pii_vault_services(&compose) {
        let env = environment(service);
        assert!(
            env.contains_key("DATABASE_URL"),
            "{name} sets no DATABASE_URL"
        );
        for var in env.keys() {
            assert!(
                known.contains(var) || is_standard(var),
                "service {name} sets {var}, which pii-vault does not read"
            );
        }
    }
}

#[test]
fn every_pii_vault_command_parses() {
    let compose = compose();
    for (name, service) in pii_vault_services(&compose) {
        let words = command(service);
        let argv = std::iter::once("pii-vault".to_string()).chain(words.iter().cloned());
        if let Err(e) = Cli::try_parse_from(argv) {
            panic!(
                "service {name}: `pii-vault {}` does not parse:\n{e}",
                words.join(" ")
            );
        }
    }
}

/// The login user of a `postgres://user:password@host/db` URL.
fn login(url: &str) -> String {
    let url = url::Url::parse(url).unwrap_or_else(|e| panic!("{url}: {e}"));
    assert!(["postgres", "postgresql"].contains(&url.scheme()), "{url}");
    url.username().to_string()
}

#[test]
fn each_role_runs_under_its_own_login() {
    let compose = compose();
    let services_map = services(&compose);
    let owner = environment(&services_map["postgres"])["POSTGRES_USER"].clone();
    let users = services_map["db-users"].to_string();
    let depends_on = |service: &Value, on: &str| {
        service["depends_on"][on]["condition"] == "service_completed_successfully"
    };
    assert!(
        depends_on(&services_map["db-users"], "migrate"),
        "the roles exist once migrate has run"
    );
    let mut roles_seen = BTreeSet::new();
    for (name, service) in pii_vault_services(&compose) {
        let user = login(&environment(service)["DATABASE_URL"]);
        let words = command(service);
        let role = match words[0].as_str() {
            "migrate" => {
                assert_eq!(user, owner, "{name}: migrate runs as the schema owner");
                continue;
            }
            "run" => "pii_vault_worker",
            "reveal" | "approve" | "audit" => "pii_vault_revealer",
            "rotate" | "forget" => "pii_vault_rotator",
            other => panic!("{name}: which role runs `{other}`?"),
        };
        assert_ne!(user, owner, "{name} runs as the owner");
        assert!(
            users.contains(&format!("GRANT {role} TO {user};")),
            "{name}: db-users does not grant {role} to {user}"
        );
        assert!(
            users.contains(&format!("'{user}'")),
            "{name}: db-users does not create {user}"
        );
        // Directly, or after a worker that is healthy only once it has
        // connected with its own login (which db-users made).
        let after_worker = name != "worker"
            && service["depends_on"]["worker"]["condition"] == "service_healthy"
            && depends_on(&services_map["worker"], "db-users");
        assert!(
            depends_on(service, "db-users") || after_worker,
            "{name} starts before its login exists"
        );
        roles_seen.insert(role);
    }
    assert_eq!(
        roles_seen,
        BTreeSet::from([
            "pii_vault_worker",
            "pii_vault_revealer",
            "pii_vault_rotator"
        ])
    );
}

/// LocalStack's free edition forgets its KMS keys when it restarts, and the
/// database's keys stay wrapped under the old one. aws-init makes the key
/// (only when the alias is missing) from an id and key material that it
/// keeps in a named volume, so the same key comes back.
#[test]
fn the_kms_key_outlives_a_localstack_restart() {
    let compose = compose();
    let init = &services(&compose)["aws-init"];
    let volume = init["volumes"]
        .as_array()
        .and_then(|v| {
            v.iter()
                .filter_map(Value::as_str)
                .find(|v| v.ends_with(":/seed"))
        })
        .expect("aws-init mounts a volume at /seed");
    let volume = volume.split(':').next().unwrap();
    assert!(
        compose["volumes"].get(volume).is_some(),
        "{volume} is not a named volume"
    );
    let script = command(init).join("\n");
    let describe = script
        .find("describe-key --key-id alias/pii-vault")
        .expect("looks for the alias");
    let create = script.find("create-key").expect("creates the key");
    assert!(
        describe < create,
        "creates a key without looking for the alias"
    );
    for needle in [
        "_custom_id_",
        "_custom_key_material_",
        "/seed/key-id",
        "/seed/key-material",
    ] {
        assert!(script.contains(needle), "aws-init lacks {needle}");
    }
    for (name, service) in pii_vault_services(&compose) {
        assert_eq!(
            environment(service)["PII_VAULT_KMS_KEY_ID"],
            "alias/pii-vault",
            "{name}"
        );
    }
}

#[test]
fn the_image_exposes_the_workers_metrics_port_from_pinned_bases() {
    let compose = compose();
    let worker = command(&services(&compose)["worker"]);
    let addr: SocketAddr = worker
        .iter()
        .position(|w| w == "--metrics-addr")
        .and_then(|i| worker.get(i + 1))
        .expect("the worker serves metrics")
        .parse()
        .expect("--metrics-addr is an address");
    assert!(
        addr.ip().is_unspecified(),
        "{addr}: unreachable from outside the container"
    );

    let dockerfile = repo_file("Dockerfile");
    let lines: Vec<&str> = dockerfile
        .lines()
        .map(str::trim)
        .filter(|l| !l.starts_with('#'))
        .collect();
    let exposed: Vec<u16> = lines
        .iter()
        .filter_map(|l| l.strip_prefix("EXPOSE "))
        .flat_map(|ports| ports.split_whitespace())
        .map(|p| p.trim_end_matches("/tcp").parse().expect("a port"))
        .collect();
    assert!(
        exposed.contains(&addr.port()),
        "EXPOSE {exposed:?}, worker listens on {addr}"
    );
    let published = services(&compose)["worker"]["ports"].to_string();
    assert!(
        published.contains(&format!(":{}\"", addr.port())),
        "the worker's port is not published: {published}"
    );

    // Base images pinned to a release: a tag with a version number.
    let froms: Vec<&str> = lines
        .iter()
        .filter_map(|l| l.strip_prefix("FROM "))
        .map(|l| l.split_whitespace().next().unwrap())
        .collect();
    assert_eq!(froms.len(), 2, "{froms:?}");
    for image in froms {
        let (_, tag) = image
            .split_once(':')
            .unwrap_or_else(|| panic!("{image}: no tag"));
        let version = tag.split('-').next().unwrap();
        assert!(
            version.split('.').count() >= 2 && version.split('.').all(|n| n.parse::<u32>().is_ok()),
            "{image}: not pinned to a version"
        );
    }
    // Dependencies build in a layer of their own, before the source is copied.
    let deps = lines
        .iter()
        .position(|l| l.contains("cargo build"))
        .unwrap();
    let src = lines.iter().position(|l| *l == "COPY src src").unwrap();
    let manifest = lines
        .iter()
        .position(|l| l.starts_with("COPY Cargo.toml Cargo.lock"))
        .unwrap();
    assert!(manifest < deps && deps < src, "no cached dependency layer");

    // Both builds use the deployed profile of Cargo.toml, and the image
    // takes the binary from that profile's directory (no engine here to
    // build it: a mismatch would only show when the image is built).
    let builds: Vec<&str> = lines
        .iter()
        .filter_map(|l| l.split("cargo build ").nth(1))
        .collect();
    assert_eq!(builds.len(), 2, "{builds:?}");
    for b in &builds {
        assert!(
            b.starts_with("--profile production "),
            "not the deployed profile: {b}"
        );
    }
    assert!(
        repo_file("Cargo.toml").contains("[profile.production]"),
        "Cargo.toml has no production profile"
    );
    assert!(
        lines
            .iter()
            .any(|l| l.starts_with("COPY --from=builder /src/target/production/pii-vault ")),
        "the image does not copy the production build"
    );
}

#[test]
fn the_worker_is_checked_by_the_healthcheck_subcommand_on_its_own_port() {
    let compose = compose();
    let worker = &services(&compose)["worker"];
    let test: Vec<&str> = worker["healthcheck"]["test"]
        .as_array()
        .expect("the worker has a healthcheck test list")
        .iter()
        .map(|w| w.as_str().unwrap())
        .collect();
    assert_eq!(test[0], "CMD", "exec form, no shell in the image: {test:?}");
    assert!(
        test[1] == "pii-vault" || test[1] == "/usr/local/bin/pii-vault",
        "{test:?}"
    );
    let cli = Cli::try_parse_from(&test[1..]).unwrap_or_else(|e| panic!("{test:?}: {e}"));
    let pii_vault::cli::Command::Healthcheck(args) = cli.command else {
        panic!("{test:?} is not `pii-vault healthcheck`");
    };
    let words = command(worker);
    let metrics: SocketAddr = words
        .iter()
        .position(|w| w == "--metrics-addr")
        .and_then(|i| words.get(i + 1))
        .unwrap()
        .parse()
        .unwrap();
    let url = args.url.expect("an explicit --url");
    assert_eq!(
        url,
        format!("http://127.0.0.1:{}/readyz", metrics.port()),
        "the healthcheck asks another port than the worker serves"
    );
}

#[test]
fn examples_wait_for_the_worker_not_the_one_shots_and_ports_and_tags_are_set() {
    let compose = compose();
    let all = services(&compose);
    for name in ["reveal", "rotate"] {
        let deps = all[name]["depends_on"]
            .as_object()
            .unwrap_or_else(|| panic!("{name}: depends_on as a map"));
        assert_eq!(
            deps.keys().collect::<Vec<_>>(),
            ["worker"],
            "{name} would re-run the init chain"
        );
        assert_eq!(deps["worker"]["condition"], "service_healthy", "{name}");
    }
    for (name, var) in [
        ("worker", "PII_VAULT_METRICS_PORT"),
        ("postgres", "PII_VAULT_POSTGRES_PORT"),
        ("localstack", "PII_VAULT_LOCALSTACK_PORT"),
    ] {
        let ports = all[name]["ports"].to_string();
        assert!(
            ports.contains(&format!("127.0.0.1:${{{var}:-")),
            "{name}: host port not from {var}: {ports}"
        );
    }
    for (name, service) in all {
        let Some(image) = service["image"].as_str() else {
            continue;
        };
        if image == "pii-vault:local" {
            continue;
        }
        let tag = image.split_once(':').map(|(_, t)| t).unwrap_or("");
        let version = tag.split('-').next().unwrap();
        assert!(
            version.split('.').count() >= 2 && version.split('.').all(|n| n.parse::<u32>().is_ok()),
            "{name}: {image} floats (no release tag)"
        );
    }
}
