//! Embeds every file of `sql/` (the one place SQL lives): `sql/migrations/V<NNN>__<name>.sql` in
//! order, and `sql/statements/<name>.sql` by name. Adding a file is all it takes.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::{env, fs};

fn sql_files(dir: &Path) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", dir.display()))
        .map(|entry| entry.expect("readable dir entry").path())
        .filter(|p| p.extension().is_some_and(|x| x == "sql"))
        .collect();
    files.sort();
    files
}

fn main() {
    let root = Path::new(&env::var("CARGO_MANIFEST_DIR").unwrap()).join("../../sql");
    let root = root.canonicalize().expect("sql/ directory next to rust/");
    println!("cargo:rerun-if-changed={}", root.display());
    let mut out = String::new();

    out.push_str("/// Numbered schema migrations (version, name, sql), applied in order.\n");
    out.push_str("pub const MIGRATIONS: &[(i32, &str, &str)] = &[\n");
    let migrations = root.join("migrations");
    println!("cargo:rerun-if-changed={}", migrations.display());
    for path in sql_files(&migrations) {
        println!("cargo:rerun-if-changed={}", path.display());
        let stem = path.file_stem().unwrap().to_str().unwrap();
        let (version, name) = stem
            .strip_prefix('V')
            .and_then(|s| s.split_once("__"))
            .unwrap_or_else(|| panic!("migration {stem} is not named V<NNN>__<name>.sql"));
        let version: i32 = version.parse().expect("numeric migration version");
        writeln!(
            out,
            "    ({version}, {name:?}, include_str!({:?})),",
            path.display().to_string()
        )
        .unwrap();
    }
    out.push_str("];\n\n/// Every protocol statement by name.\npub const STATEMENTS: &[(&str, &str)] = &[\n");
    let statements = root.join("statements");
    println!("cargo:rerun-if-changed={}", statements.display());
    for path in sql_files(&statements) {
        println!("cargo:rerun-if-changed={}", path.display());
        let name = path.file_stem().unwrap().to_str().unwrap();
        writeln!(out, "    ({name:?}, include_str!({:?})),", path.display().to_string()).unwrap();
    }
    out.push_str("];\n");
    fs::write(Path::new(&env::var("OUT_DIR").unwrap()).join("sql_files.rs"), out).unwrap();
}
