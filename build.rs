// `sqlx::migrate!` embeds the migration directories at compile time, but
// cargo does not know that they are inputs: without this, a new migration
// file leaves an up-to-date binary that silently lacks it.
//
// It also lists migrations/postgres/functions/*.sql, in name order, for
// `include_str!` (src/store/postgres.rs): the files `migrate` re-applies
// after the versioned migrations, so that a new file needs no code change.
use std::fmt::Write as _;

fn main() {
    git_commit();
    println!("cargo:rerun-if-changed=migrations");
    println!("cargo:rerun-if-changed=migrations/postgres/functions");
    let dir =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("migrations/postgres/functions");
    let mut names: Vec<String> = std::fs::read_dir(&dir)
        .expect("migrations/postgres/functions")
        .map(|e| {
            e.expect("a directory entry")
                .file_name()
                .to_string_lossy()
                .into_owned()
        })
        .filter(|n| n.ends_with(".sql"))
        .collect();
    names.sort();
    let mut out = String::from("&[\n");
    for n in &names {
        let path = dir.join(n);
        writeln!(
            out,
            "    ({n:?}, include_str!({:?})),",
            path.display().to_string()
        )
        .unwrap();
    }
    out.push(']');
    let dest = std::path::Path::new(&std::env::var("OUT_DIR").unwrap()).join("pg_functions.rs");
    std::fs::write(dest, out).unwrap();
}

/// `PII_VAULT_COMMIT` for `--version` and `pii_vault_build_info`: the
/// environment's `PII_VAULT_COMMIT` when set (a Docker build without `.git`
/// can pass it as a build argument), else `git rev-parse --short HEAD`,
/// else `unknown`. (No `-dirty` mark: the build script does not rerun on
/// every edit, so it could not be kept true.)
fn git_commit() {
    println!("cargo:rerun-if-env-changed=PII_VAULT_COMMIT");
    let git = |args: &[&str]| {
        std::process::Command::new("git")
            .args(args)
            .current_dir(env!("CARGO_MANIFEST_DIR"))
            .output()
            .ok()
            .filter(|o| o.status.success())
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
    };
    let commit = std::env::var("PII_VAULT_COMMIT")
        .ok()
        .filter(|c| !c.trim().is_empty())
        .or_else(|| git(&["rev-parse", "--short=12", "HEAD"]).filter(|h| !h.is_empty()))
        .unwrap_or_else(|| "unknown".into());
    println!("cargo:rustc-env=PII_VAULT_COMMIT={commit}");
    // A new commit (or checkout) changes HEAD or the ref it points to.
    // (In a worktree, HEAD is in its own git dir and the refs in the common one.)
    let dirs = [
        git(&["rev-parse", "--absolute-git-dir"]),
        git(&["rev-parse", "--path-format=absolute", "--git-common-dir"]),
    ];
    let head_ref = git(&["symbolic-ref", "-q", "HEAD"]);
    for dir in dirs.iter().flatten() {
        for file in ["HEAD", "packed-refs"]
            .into_iter()
            .map(String::from)
            .chain(head_ref.clone())
        {
            let path = std::path::Path::new(dir).join(file);
            if path.exists() {
                println!("cargo:rerun-if-changed={}", path.display());
            }
        }
    }
}
