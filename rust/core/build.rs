//! Embeds the SQL of `sql/` (the one place it lives): `sql/migrations/V<NNN>__<name>.sql` in
//! order, and the named statements of `sql/statements/*.sql`. A statements file holds blocks
//! that each start with a `-- name: <name>` line, followed by header comment lines (what the
//! statement does, its parameters) and the statement's text; comment and blank lines before the
//! first block describe the file. The same format is parsed by `python/commandbus/_sql.py`
//! (`parse_statements`) for the development override `RCMD_SQL_DIR`.

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

/// The (name, text) blocks of a statements file: the text without its header comment lines,
/// surrounding whitespace trimmed. Panics (a build error) on text outside a named block, a block
/// without a text, or an invalid name.
fn parse_statements(source: &str, path: &Path) -> Vec<(String, String)> {
    let mut blocks: Vec<(String, String)> = Vec::new();
    let mut in_header = false;
    for (i, line) in source.lines().enumerate() {
        if let Some(name) = line.strip_prefix("-- name:") {
            let name = name.trim();
            let valid = !name.is_empty()
                && name
                    .chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_');
            assert!(valid, "{}:{}: invalid statement name {name:?}", path.display(), i + 1);
            blocks.push((name.to_owned(), String::new()));
            in_header = true;
            continue;
        }
        let Some((_, text)) = blocks.last_mut() else {
            let trimmed = line.trim_start();
            assert!(
                trimmed.is_empty() || trimmed.starts_with("--"),
                "{}:{}: SQL outside a `-- name:` block",
                path.display(),
                i + 1
            );
            continue;
        };
        if in_header && line.starts_with("--") {
            continue;
        }
        in_header = false;
        text.push_str(line);
        text.push('\n');
    }
    for (name, text) in &mut blocks {
        *text = text.trim().to_owned();
        assert!(!text.is_empty(), "{}: statement {name} has no text", path.display());
    }
    blocks
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
    let mut seen: Vec<String> = Vec::new();
    for path in sql_files(&statements) {
        println!("cargo:rerun-if-changed={}", path.display());
        let source = fs::read_to_string(&path).unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
        for (name, text) in parse_statements(&source, &path) {
            assert!(
                !seen.contains(&name),
                "{}: statement {name} is defined twice",
                path.display()
            );
            writeln!(out, "    ({name:?}, {text:?}),").unwrap();
            seen.push(name);
        }
    }
    out.push_str("];\n");
    fs::write(Path::new(&env::var("OUT_DIR").unwrap()).join("sql_files.rs"), out).unwrap();
}
