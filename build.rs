// `sqlx::migrate!` embeds the migration directories at compile time, but
// cargo does not know that they are inputs: without this, a new migration
// file leaves an up-to-date binary that silently lacks it.
//
// It also lists migrations/postgres/functions/*.sql, in name order, for
// `include_str!` (src/store/postgres.rs): the files `migrate` re-applies
// after the versioned migrations, so that a new file needs no code change.
use std::fmt::Write as _;

fn main() {
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
