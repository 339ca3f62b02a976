//! The codebase's conventions as tests, run with the rest of the suite (rust-analyzer's
//! `tidy` tests are the model): every source file opens with `//!`, no function outside
//! tests runs over 80 lines, the crate graph is ARCHITECTURE.md's layer table, no test
//! sleeps to assert a duration, and no product file reads the developers' shared folder.
//! Each failure names the file and line.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use syn::spanned::Spanned;
use syn::visit::Visit;

/// Longest function body allowed outside tests, in lines (signature to closing brace).
const MAX_FN_LINES: usize = 80;

/// The folders that hold brisk's own code.
const CODE_DIRS: [&str; 5] = ["crates", "xtask", "benches", "scripts", "experiments"];

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// Every file under `dir` (relative to the root) whose name ends in one of `exts`,
/// skipping build output.
fn files(exts: &[&str]) -> Vec<PathBuf> {
    fn walk(dir: &Path, exts: &[&str], out: &mut Vec<PathBuf>) {
        let Ok(entries) = std::fs::read_dir(dir) else {
            return;
        };
        for e in entries.flatten() {
            let p = e.path();
            let name = e.file_name().to_string_lossy().into_owned();
            if p.is_dir() {
                if name != "target" && !name.starts_with('.') && name != "__pycache__" {
                    walk(&p, exts, out);
                }
            } else if exts.iter().any(|x| name.ends_with(x)) {
                out.push(p);
            }
        }
    }
    let mut out = Vec::new();
    for d in CODE_DIRS {
        walk(&root().join(d), exts, &mut out);
    }
    out.sort();
    out
}

/// `path` relative to the repository root, for messages.
fn shown(path: &Path) -> String {
    path.strip_prefix(root()).unwrap_or(path).display().to_string()
}

/// Whether a Rust file is test code as a whole (an integration test).
fn is_test_file(path: &Path) -> bool {
    path.components().any(|c| c.as_os_str() == "tests")
}

/// Fails with every finding, one per line.
fn report(what: &str, findings: Vec<String>) -> Result<()> {
    if findings.is_empty() {
        Ok(())
    } else {
        bail!("{what}:\n{}", findings.join("\n"))
    }
}

#[test]
fn every_rust_file_opens_with_a_doc_line() -> Result<()> {
    let mut findings = Vec::new();
    for f in files(&[".rs"]) {
        let text = std::fs::read_to_string(&f)?;
        if !text.starts_with("//!") {
            findings.push(format!(
                "{}:1: does not open with a `//!` line saying what it is for",
                shown(&f)
            ));
        }
    }
    report("files without a `//!` opening line", findings)
}

/// Collects functions over the limit, skipping test code.
struct LongFns<'a> {
    file: &'a str,
    findings: Vec<String>,
}

fn is_test_attr(attrs: &[syn::Attribute]) -> bool {
    attrs.iter().any(|a| {
        let p = a.path();
        if p.is_ident("test") || p.segments.last().is_some_and(|s| s.ident == "test") {
            return true;
        }
        p.is_ident("cfg")
            && a.parse_args::<syn::Meta>()
                .is_ok_and(|m| m.path().is_ident("test"))
    })
}

impl LongFns<'_> {
    /// Lines from the signature's `fn` to the body's closing brace (doc comments and
    /// attributes not counted).
    fn check(&mut self, sig: &syn::Signature, attrs: &[syn::Attribute], body: proc_macro2::Span) {
        if is_test_attr(attrs) {
            return;
        }
        let name = &sig.ident;
        let (start, end) = (sig.fn_token.span.start().line, body.end().line);
        let lines = end + 1 - start;
        if lines > MAX_FN_LINES {
            self.findings.push(format!(
                "{}:{start}: fn {name} is {lines} lines (at most {MAX_FN_LINES} outside tests): split it",
                self.file
            ));
        }
    }
}

impl<'ast> Visit<'ast> for LongFns<'_> {
    fn visit_item_mod(&mut self, m: &'ast syn::ItemMod) {
        if !is_test_attr(&m.attrs) {
            syn::visit::visit_item_mod(self, m);
        }
    }
    fn visit_item_fn(&mut self, f: &'ast syn::ItemFn) {
        self.check(&f.sig, &f.attrs, f.block.span());
        syn::visit::visit_item_fn(self, f);
    }
    fn visit_impl_item_fn(&mut self, f: &'ast syn::ImplItemFn) {
        self.check(&f.sig, &f.attrs, f.block.span());
        syn::visit::visit_impl_item_fn(self, f);
    }
    fn visit_trait_item_fn(&mut self, f: &'ast syn::TraitItemFn) {
        if let Some(body) = &f.default {
            self.check(&f.sig, &f.attrs, body.span());
        }
        syn::visit::visit_trait_item_fn(self, f);
    }
}

fn parse(path: &Path) -> Result<syn::File> {
    let text = std::fs::read_to_string(path)?;
    syn::parse_file(&text).with_context(|| format!("{}: does not parse", shown(path)))
}

#[test]
fn no_function_outside_tests_is_longer_than_the_limit() -> Result<()> {
    let mut findings = Vec::new();
    for f in files(&[".rs"]).into_iter().filter(|f| !is_test_file(f)) {
        let file = shown(&f);
        let mut v = LongFns {
            file: &file,
            findings: Vec::new(),
        };
        v.visit_file(&parse(&f)?);
        findings.extend(v.findings);
    }
    report("functions over the limit", findings)
}

/// Test functions that sleep and assert on a time.
struct SleepAsserts<'a> {
    file: &'a str,
    in_test: bool,
    findings: Vec<String>,
}

/// Words in an assertion that make it an assertion about elapsed time.
const TIME_WORDS: [&str; 6] = [
    "elapsed",
    "as_secs",
    "as_millis",
    "as_micros",
    "Duration",
    "Instant",
];

impl<'ast> Visit<'ast> for SleepAsserts<'_> {
    fn visit_item_mod(&mut self, m: &'ast syn::ItemMod) {
        let was = self.in_test;
        self.in_test |= is_test_attr(&m.attrs);
        syn::visit::visit_item_mod(self, m);
        self.in_test = was;
    }
    fn visit_item_fn(&mut self, f: &'ast syn::ItemFn) {
        if !(self.in_test || is_test_attr(&f.attrs)) {
            return;
        }
        let body = f.block.to_token_stream_string();
        if !body.contains("sleep") {
            return;
        }
        let mut asserts = AssertMacros::default();
        asserts.visit_block(&f.block);
        for (line, tokens) in asserts.found {
            if TIME_WORDS.iter().any(|w| tokens.contains(w)) {
                self.findings.push(format!(
                    "{}:{line}: fn {} sleeps and asserts a duration; check the work done, not the time it took",
                    self.file, f.sig.ident
                ));
            }
        }
    }
}

/// Assertion macros in a block: (line, their tokens).
#[derive(Default)]
struct AssertMacros {
    found: Vec<(usize, String)>,
}

impl<'ast> Visit<'ast> for AssertMacros {
    fn visit_macro(&mut self, m: &'ast syn::Macro) {
        let name = m
            .path
            .segments
            .last()
            .map(|s| s.ident.to_string())
            .unwrap_or_default();
        if name.contains("assert") || name == "ensure" {
            self.found.push((m.span().start().line, m.tokens.to_string()));
        }
    }
}

trait TokenText {
    fn to_token_stream_string(&self) -> String;
}

impl<T: quote::ToTokens> TokenText for T {
    fn to_token_stream_string(&self) -> String {
        self.to_token_stream().to_string()
    }
}

#[test]
fn no_test_sleeps_to_assert_a_duration() -> Result<()> {
    let mut findings = Vec::new();
    for f in files(&[".rs"]) {
        let file = shown(&f);
        let mut v = SleepAsserts {
            file: &file,
            in_test: is_test_file(&f),
            findings: Vec::new(),
        };
        v.visit_file(&parse(&f)?);
        findings.extend(v.findings);
    }
    report("tests that assert a slept duration", findings)
}

#[test]
fn no_product_file_reads_the_developers_shared_folder() -> Result<()> {
    // Spelled in two parts so that this file does not find itself.
    let needle = format!("..{}shared", '/');
    let mut findings = Vec::new();
    for f in files(&[".rs", ".py", ".sh", ".toml"]) {
        let text = std::fs::read_to_string(&f)?;
        for (n, line) in text.lines().enumerate() {
            if line.contains(&needle) {
                findings.push(format!(
                    "{}:{}: names {needle}, which a user's clone does not have: carry what it needs in the repository",
                    shown(&f),
                    n + 1
                ));
            }
        }
    }
    report("product files that read the shared folder", findings)
}

/// One row of ARCHITECTURE.md's layer table.
#[derive(Debug)]
struct Layer {
    line: usize,
    layer: u32,
    uses: BTreeSet<String>,
    tests_use: BTreeSet<String>,
    candle: bool,
}

/// ARCHITECTURE.md's layer table: the rows between `<!-- tidy:layers -->` and the next
/// blank line, `| layer | crate | uses | its tests also use | candle |`.
fn layer_table() -> Result<BTreeMap<String, Layer>> {
    let text = std::fs::read_to_string(root().join("ARCHITECTURE.md"))?;
    let start = text
        .lines()
        .position(|l| l.trim() == "<!-- tidy:layers -->")
        .context("ARCHITECTURE.md has no `<!-- tidy:layers -->` table")?;
    let set = |cell: &str| -> BTreeSet<String> {
        cell.split(',')
            .map(|c| c.trim().trim_matches('`').to_string())
            .filter(|c| !c.is_empty() && c != "–")
            .collect()
    };
    let mut table = BTreeMap::new();
    for (n, line) in text.lines().enumerate().skip(start + 1) {
        if line.trim().is_empty() {
            break;
        }
        let cells: Vec<&str> = line.trim().trim_matches('|').split('|').map(str::trim).collect();
        let Ok(layer) = cells[0].parse::<u32>() else {
            continue;
        };
        if cells.len() != 5 {
            bail!("ARCHITECTURE.md:{}: a layer row has 5 cells", n + 1);
        }
        table.insert(
            cells[1].trim_matches('`').to_string(),
            Layer {
                line: n + 1,
                layer,
                uses: set(cells[2]),
                tests_use: set(cells[3]),
                candle: cells[4] == "yes",
            },
        );
    }
    Ok(table)
}

/// The workspace's crates from `cargo metadata`: name → (normal and build dependencies
/// inside the workspace, dev dependencies inside it, whether candle is in its tree).
type Graph = BTreeMap<String, (BTreeSet<String>, BTreeSet<String>, bool)>;

/// The host's target triple, from `rustc -vV`.
fn host_triple() -> Result<String> {
    let out = std::process::Command::new("rustc").arg("-vV").output()?;
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .find_map(|l| l.strip_prefix("host: "))
        .map(str::to_string)
        .context("rustc -vV names no host")
}

fn cargo_graph() -> Result<Graph> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    // This machine's platform only: other platforms' crates need not be downloaded. Every
    // feature on: the table names what any build can use (brisk-dist's NCCL, say).
    let host = host_triple()?;
    let out = std::process::Command::new(cargo)
        .args(["metadata", "--format-version=1", "--all-features"])
        .args(["--filter-platform", &host])
        .current_dir(root())
        .output()?;
    if !out.status.success() {
        bail!("cargo metadata failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    let m: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    let members: BTreeSet<&str> = m["workspace_members"]
        .as_array()
        .context("no workspace_members")?
        .iter()
        .filter_map(|v| v.as_str())
        .collect();
    let nodes = m["resolve"]["nodes"].as_array().context("no resolve graph")?;
    let by_id: BTreeMap<&str, &serde_json::Value> = nodes
        .iter()
        .filter_map(|n| Some((n["id"].as_str()?, n)))
        .collect();
    let name = |id: &str| -> String {
        m["packages"]
            .as_array()
            .and_then(|ps| ps.iter().find(|p| p["id"] == id))
            .and_then(|p| p["name"].as_str())
            .unwrap_or(id)
            .to_string()
    };
    // Whether candle-core is reachable through normal dependencies.
    let has_candle = |id: &str| -> bool {
        let mut seen = BTreeSet::new();
        let mut stack = vec![id.to_string()];
        while let Some(id) = stack.pop() {
            if !seen.insert(id.clone()) {
                continue;
            }
            if name(&id) == "candle-core" {
                return true;
            }
            for d in by_id
                .get(id.as_str())
                .and_then(|n| n["deps"].as_array())
                .into_iter()
                .flatten()
            {
                let normal = d["dep_kinds"]
                    .as_array()
                    .is_some_and(|ks| ks.iter().any(|k| k["kind"].is_null()));
                if let (true, Some(p)) = (normal, d["pkg"].as_str()) {
                    stack.push(p.to_string());
                }
            }
        }
        false
    };
    let mut graph = Graph::new();
    for id in &members {
        let node = by_id.get(id).context("a member without a resolve node")?;
        let (mut uses, mut tests_use) = (BTreeSet::new(), BTreeSet::new());
        for d in node["deps"].as_array().into_iter().flatten() {
            let Some(pkg) = d["pkg"].as_str().filter(|p| members.contains(p)) else {
                continue;
            };
            for k in d["dep_kinds"].as_array().into_iter().flatten() {
                if k["kind"] == "dev" {
                    tests_use.insert(name(pkg));
                } else {
                    uses.insert(name(pkg));
                }
            }
        }
        graph.insert(name(id), (uses, tests_use, has_candle(id)));
    }
    Ok(graph)
}

#[test]
fn the_crate_graph_is_the_layer_table_in_architecture_md() -> Result<()> {
    let table = layer_table()?;
    let graph = cargo_graph()?;
    let mut findings = Vec::new();
    let at = |l: &Layer| format!("ARCHITECTURE.md:{}", l.line);
    for (krate, (uses, tests_use, candle)) in &graph {
        let Some(row) = table.get(krate) else {
            findings.push(format!("ARCHITECTURE.md: the layer table has no row for {krate}"));
            continue;
        };
        if uses != &row.uses {
            findings.push(format!(
                "{}: {krate} uses {uses:?}, the table says {:?}",
                at(row),
                row.uses
            ));
        }
        if tests_use != &row.tests_use {
            findings.push(format!(
                "{}: {krate}'s tests use {tests_use:?}, the table says {:?}",
                at(row),
                row.tests_use
            ));
        }
        if *candle != row.candle {
            findings.push(format!(
                "{}: {krate} {} candle in its dependency tree, the table says {}",
                at(row),
                if *candle { "has" } else { "has no" },
                if row.candle { "yes" } else { "no" }
            ));
        }
        for dep in uses {
            if let Some(d) = table.get(dep).filter(|d| d.layer >= row.layer) {
                findings.push(format!(
                    "{}: {krate} (layer {}) uses {dep} (layer {}): a crate uses only lower layers",
                    at(row),
                    row.layer,
                    d.layer
                ));
            }
        }
    }
    for (krate, row) in &table {
        if !graph.contains_key(krate) {
            findings.push(format!("{}: {krate} is not a workspace crate", at(row)));
        }
    }
    report("ARCHITECTURE.md's layer table against `cargo metadata`", findings)
}
