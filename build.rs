// `sqlx::migrate!` embeds the migration directories at compile time, but
// cargo does not know that they are inputs: without this, a new migration
// file leaves an up-to-date binary that silently lacks it.
fn main() {
    println!("cargo:rerun-if-changed=migrations");
}
