//! The layering check: no import cycle between tarpit-user's top-level
//! modules (the `pub mod` entries of `src/lib.rs`), and no module but
//! `kernel` using aya.
//!
//! Why a test: the layering lib.rs describes (config and smtp at the bottom,
//! kernel alone behind aya, ..., run and cli at the top) is what lets a
//! newcomer change one layer without reading the ones above it. Nothing in
//! rustc stops a module from reaching upwards, and a single inline
//! `crate::x::f()` in a log line is enough to tie two layers into one, so
//! this test parses every file under `src/` with `syn` and counts
//! - `use` trees (`crate::`, `super::`, `self::`, groups, globs, renames),
//! - inline paths in code, types, patterns and attributes,
//! - `crate::a::b` sequences inside macro token streams (`info!(...)`,
//!   `tokio::select!`, `macro_rules!` bodies with `$crate::`), which syn
//!   leaves unparsed,
//!
//! resolves `super::`/`self::` against the file's module path (inline `mod`
//! blocks included), maps each path to its top-level module and looks for
//! strongly connected components (Tarjan). Each cycle is printed with one
//! `file:line` per edge, so whoever broke the layering sees where to cut.
//!
//! Test code counts too (`#[cfg(test)] mod tests`): a cycle that only tests
//! close still means the layers cannot be compiled or read apart.
use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use proc_macro2::{Spacing, Span, TokenStream, TokenTree};
use syn::visit::Visit;

/// The crates only `kernel` may name.
const KERNEL_ONLY_CRATES: &[&str] = &["aya", "aya_log"];
/// The one top-level module allowed to use them.
const KERNEL_MODULE: &str = "kernel";

/// Where a dependency was seen.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
struct Site {
    file: String,
    line: usize,
    /// The path as written (resolved form for `super::`), for the message.
    path: String,
}

impl std::fmt::Display for Site {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "src/{}:{} ({})", self.file, self.line, self.path)
    }
}

/// What the check found.
#[derive(Debug, Default)]
struct Findings {
    /// Edges between distinct top-level modules: (from, to) -> first site
    /// and how many sites in all.
    edges: BTreeMap<(String, String), (Site, usize)>,
    /// Uses of aya outside `kernel`.
    aya: Vec<Site>,
    /// Files syn could not parse (the check cannot vouch for them).
    unparsed: Vec<String>,
}

impl Findings {
    /// Every cycle worth reporting: for each edge inside a strongly
    /// connected component, the shortest cycle through it (deduplicated),
    /// so every edge that could be cut is shown once.
    fn cycles(&self) -> Vec<Vec<String>> {
        let graph = self.graph();
        let mut seen = BTreeSet::new();
        let mut out = Vec::new();
        for comp in tarjan(&graph) {
            if comp.len() < 2 {
                continue;
            }
            let inside: BTreeSet<&String> = comp.iter().collect();
            for from in &comp {
                for to in graph[from].iter().filter(|t| inside.contains(t)) {
                    let Some(back) = shortest_path(&graph, to, from, &inside) else {
                        continue;
                    };
                    let mut cycle = vec![from.clone()];
                    cycle.extend(back);
                    // cycle = from, to, ..., from; normalise its rotation.
                    cycle.pop();
                    let start = cycle
                        .iter()
                        .enumerate()
                        .min_by_key(|(_, n)| *n)
                        .map_or(0, |(i, _)| i);
                    cycle.rotate_left(start);
                    if seen.insert(cycle.clone()) {
                        out.push(cycle);
                    }
                }
            }
        }
        out
    }

    fn graph(&self) -> BTreeMap<String, Vec<String>> {
        let mut g: BTreeMap<String, Vec<String>> = BTreeMap::new();
        for (from, to) in self.edges.keys() {
            g.entry(from.clone()).or_default().push(to.clone());
            g.entry(to.clone()).or_default();
        }
        g
    }

    /// The human report; empty when the layering holds.
    fn report(&self) -> String {
        let mut s = String::new();
        for cycle in self.cycles() {
            let mut names = cycle.clone();
            names.push(cycle[0].clone());
            let _ = writeln!(s, "import cycle: {}", names.join(" -> "));
            for pair in names.windows(2) {
                let (site, n) = &self.edges[&(pair[0].clone(), pair[1].clone())];
                let more = if *n > 1 {
                    format!(" and {} more", n - 1)
                } else {
                    String::new()
                };
                let _ = writeln!(s, "    {} -> {}: {site}{more}", pair[0], pair[1]);
            }
        }
        for site in &self.aya {
            let _ = writeln!(
                s,
                "aya outside `{KERNEL_MODULE}`: {site} (move what touches aya into \
                 src/{KERNEL_MODULE}/ and call that)"
            );
        }
        for f in &self.unparsed {
            let _ = writeln!(s, "cannot parse src/{f}: the check cannot see its imports");
        }
        s
    }
}

/// Tarjan's strongly connected components.
fn tarjan(g: &BTreeMap<String, Vec<String>>) -> Vec<Vec<String>> {
    struct State<'a> {
        g: &'a BTreeMap<String, Vec<String>>,
        index: BTreeMap<&'a str, usize>,
        low: BTreeMap<&'a str, usize>,
        stack: Vec<&'a str>,
        on_stack: BTreeSet<&'a str>,
        next: usize,
        out: Vec<Vec<String>>,
    }
    fn strong<'a>(st: &mut State<'a>, v: &'a str) {
        st.index.insert(v, st.next);
        st.low.insert(v, st.next);
        st.next += 1;
        st.stack.push(v);
        st.on_stack.insert(v);
        for w in &st.g[v] {
            let w = w.as_str();
            if !st.index.contains_key(w) {
                strong(st, w);
                let lw = st.low[w];
                let lv = st.low.get_mut(v).expect("visited");
                *lv = (*lv).min(lw);
            } else if st.on_stack.contains(w) {
                let iw = st.index[w];
                let lv = st.low.get_mut(v).expect("visited");
                *lv = (*lv).min(iw);
            }
        }
        if st.low[v] == st.index[v] {
            let mut comp = Vec::new();
            while let Some(w) = st.stack.pop() {
                st.on_stack.remove(w);
                comp.push(w.to_string());
                if w == v {
                    break;
                }
            }
            comp.sort();
            st.out.push(comp);
        }
    }
    let mut st = State {
        g,
        index: BTreeMap::new(),
        low: BTreeMap::new(),
        stack: Vec::new(),
        on_stack: BTreeSet::new(),
        next: 0,
        out: Vec::new(),
    };
    for v in g.keys() {
        if !st.index.contains_key(v.as_str()) {
            strong(&mut st, v);
        }
    }
    st.out
}

/// Breadth-first path `from` .. `to` inside `within`, both ends included.
fn shortest_path(
    g: &BTreeMap<String, Vec<String>>,
    from: &str,
    to: &str,
    within: &BTreeSet<&String>,
) -> Option<Vec<String>> {
    let mut prev: BTreeMap<&str, &str> = BTreeMap::new();
    let mut queue = VecDeque::from([from]);
    let mut seen = BTreeSet::from([from]);
    while let Some(v) = queue.pop_front() {
        if v == to {
            let mut path = vec![to.to_string()];
            let mut cur = to;
            while cur != from {
                cur = prev[cur];
                path.push(cur.to_string());
            }
            path.reverse();
            return Some(path);
        }
        for w in &g[v] {
            if within.contains(w) && seen.insert(w.as_str()) {
                prev.insert(w.as_str(), v);
                queue.push_back(w.as_str());
            }
        }
    }
    None
}

/// The top-level modules: the `mod x;` items of lib.rs.
fn top_modules(lib_rs: &str) -> BTreeSet<String> {
    let file = syn::parse_file(lib_rs).expect("src/lib.rs parses");
    file.items
        .iter()
        .filter_map(|i| match i {
            syn::Item::Mod(m) => Some(m.ident.to_string()),
            _ => None,
        })
        .collect()
}

/// The module path of a file under src/: `a/b.rs` and `a/b/mod.rs` are
/// `a::b`, `lib.rs` is the crate root. None for files outside the library
/// (main.rs, src/bin/).
fn module_path(rel: &str) -> Option<Vec<String>> {
    if rel == "main.rs" || rel.starts_with("bin/") {
        return None;
    }
    if rel == "lib.rs" {
        return Some(Vec::new());
    }
    let stem = rel.strip_suffix(".rs")?;
    let mut parts: Vec<String> = stem.split('/').map(str::to_string).collect();
    if parts.last().is_some_and(|p| p == "mod") {
        parts.pop();
    }
    Some(parts)
}

/// Walks one file's syntax tree, recording what it names.
struct FileVisitor<'a> {
    file: &'a str,
    /// The module the code being visited sits in (file path plus inline
    /// `mod` blocks); None outside the library (main.rs): aya check only.
    module: Option<Vec<String>>,
    top: &'a BTreeSet<String>,
    out: &'a mut Findings,
}

impl FileVisitor<'_> {
    /// Records one path, given as its segments.
    fn record(&mut self, segs: &[String], span: Span) {
        let Some(first) = segs.first() else { return };
        let line = span.start().line;
        let written = segs.join("::");
        let in_kernel = self
            .module
            .as_ref()
            .is_some_and(|m| m.first().is_some_and(|t| t == KERNEL_MODULE));
        if KERNEL_ONLY_CRATES.contains(&first.as_str()) && !in_kernel {
            self.out.aya.push(Site {
                file: self.file.to_string(),
                line,
                path: written.clone(),
            });
        }
        let Some(module) = &self.module else { return };
        let Some(abs) = resolve(module, segs) else {
            return;
        };
        let (Some(from), Some(to)) = (module.first(), abs.first()) else {
            return;
        };
        if from == to || !self.top.contains(to) {
            return;
        }
        let site = Site {
            file: self.file.to_string(),
            line,
            path: written,
        };
        self.out
            .edges
            .entry((from.clone(), to.clone()))
            .and_modify(|(first, n)| {
                *n += 1;
                if site < *first {
                    *first = site.clone();
                }
            })
            .or_insert((site, 1));
    }

    fn use_tree(&mut self, prefix: &mut Vec<String>, tree: &syn::UseTree) {
        match tree {
            syn::UseTree::Path(p) => {
                prefix.push(p.ident.to_string());
                self.use_tree(prefix, &p.tree);
                prefix.pop();
            }
            syn::UseTree::Name(n) => {
                prefix.push(n.ident.to_string());
                self.record(&prefix.clone(), n.ident.span());
                prefix.pop();
            }
            syn::UseTree::Rename(r) => {
                prefix.push(r.ident.to_string());
                self.record(&prefix.clone(), r.ident.span());
                prefix.pop();
            }
            syn::UseTree::Glob(g) => {
                self.record(&prefix.clone(), g.star_token.span);
            }
            syn::UseTree::Group(g) => {
                for t in &g.items {
                    self.use_tree(prefix, t);
                }
            }
        }
    }

    /// Finds `crate::a::b`, `$crate::a`, `super::a`, `self::a` and
    /// `aya::...` sequences in tokens syn left unparsed.
    fn tokens(&mut self, ts: TokenStream) {
        let toks: Vec<TokenTree> = ts.into_iter().collect();
        let mut i = 0;
        while i < toks.len() {
            match &toks[i] {
                TokenTree::Group(g) => {
                    self.tokens(g.stream());
                    i += 1;
                }
                TokenTree::Literal(l) => {
                    self.literal(l);
                    i += 1;
                }
                TokenTree::Ident(id) => {
                    let name = id.to_string();
                    let starts = matches!(name.as_str(), "crate" | "super" | "self")
                        || KERNEL_ONLY_CRATES.contains(&name.as_str());
                    // `aya` must start a path, not end one (`x::aya`).
                    let after_colons = i >= 2
                        && is_colon(&toks[i - 1], Spacing::Alone)
                        && is_colon(&toks[i - 2], Spacing::Joint);
                    if !starts || (after_colons && name != "crate") {
                        i += 1;
                        continue;
                    }
                    let mut segs = vec![name];
                    let mut j = i + 1;
                    while j + 2 < toks.len()
                        && is_colon(&toks[j], Spacing::Joint)
                        && is_colon(&toks[j + 1], Spacing::Alone)
                    {
                        let TokenTree::Ident(next) = &toks[j + 2] else {
                            break;
                        };
                        segs.push(next.to_string());
                        j += 3;
                    }
                    if segs.len() > 1 {
                        self.record(&segs, id.span());
                    }
                    i = j.max(i + 1);
                }
                TokenTree::Punct(_) => i += 1,
            }
        }
    }

    /// A string literal that is a whole path (`#[serde(with = "crate::x")]`).
    fn literal(&mut self, l: &proc_macro2::Literal) {
        let text = l.to_string();
        let Some(inner) = text.strip_prefix('"').and_then(|t| t.strip_suffix('"')) else {
            return;
        };
        if let Ok(p) = syn::parse_str::<syn::Path>(inner) {
            let segs: Vec<String> = p.segments.iter().map(|s| s.ident.to_string()).collect();
            if segs.len() > 1 {
                self.record(&segs, l.span());
            }
        }
    }
}

fn is_colon(t: &TokenTree, spacing: Spacing) -> bool {
    matches!(t, TokenTree::Punct(p) if p.as_char() == ':' && p.spacing() == spacing)
}

/// `segs` as an absolute path from the crate root, when it is one of the
/// crate's own (`crate::`, `super::`, `self::`); None for other crates and
/// for names relative to the current module (they stay inside it).
fn resolve(module: &[String], segs: &[String]) -> Option<Vec<String>> {
    let (mut base, mut rest) = match segs[0].as_str() {
        "crate" => (Vec::new(), &segs[1..]),
        "self" => (module.to_vec(), &segs[1..]),
        "super" => (module.to_vec(), segs),
        _ => return None,
    };
    while let Some(s) = rest.first() {
        if s != "super" {
            break;
        }
        // Above the crate root: not ours to judge (rustc refuses it).
        base.pop()?;
        rest = &rest[1..];
    }
    base.extend(rest.iter().cloned());
    Some(base)
}

impl<'ast> Visit<'ast> for FileVisitor<'_> {
    fn visit_item_mod(&mut self, m: &'ast syn::ItemMod) {
        for a in &m.attrs {
            self.visit_attribute(a);
        }
        if let Some((_, items)) = &m.content {
            if let Some(module) = &mut self.module {
                module.push(m.ident.to_string());
            }
            for i in items {
                self.visit_item(i);
            }
            if let Some(module) = &mut self.module {
                module.pop();
            }
        }
    }

    fn visit_item_use(&mut self, u: &'ast syn::ItemUse) {
        // `use ::aya::x` names the same segments as `use aya::x`.
        self.use_tree(&mut Vec::new(), &u.tree);
    }

    fn visit_path(&mut self, p: &'ast syn::Path) {
        let segs: Vec<String> = p.segments.iter().map(|s| s.ident.to_string()).collect();
        if segs.len() > 1 || p.leading_colon.is_some() {
            let span = p
                .segments
                .first()
                .map_or_else(Span::call_site, |s| s.ident.span());
            self.record(&segs, span);
        }
        syn::visit::visit_path(self, p);
    }

    fn visit_macro(&mut self, m: &'ast syn::Macro) {
        self.visit_path(&m.path);
        self.tokens(m.tokens.clone());
    }

    fn visit_attribute(&mut self, a: &'ast syn::Attribute) {
        // Doc comments may name any module; they are not dependencies.
        if a.path().is_ident("doc") {
            return;
        }
        match &a.meta {
            syn::Meta::Path(p) => self.visit_path(p),
            syn::Meta::List(l) => self.tokens(l.tokens.clone()),
            syn::Meta::NameValue(nv) => self.visit_expr(&nv.value),
        }
    }
}

/// Runs the check over `files` (path relative to src/, text); `lib.rs`
/// must be among them.
fn check(files: &[(String, String)]) -> Findings {
    let lib = files
        .iter()
        .find(|(p, _)| p == "lib.rs")
        .map(|(_, t)| t.as_str())
        .expect("lib.rs among the files");
    let top = top_modules(lib);
    let mut out = Findings::default();
    for (rel, text) in files {
        let Ok(ast) = syn::parse_file(text) else {
            out.unparsed.push(rel.clone());
            continue;
        };
        let mut v = FileVisitor {
            file: rel,
            module: module_path(rel),
            top: &top,
            out: &mut out,
        };
        v.visit_file(&ast);
    }
    out
}

/// Every .rs file under `dir`, as (path relative to `root`, text).
fn read_tree(root: &Path, dir: &Path, out: &mut Vec<(String, String)>) {
    let mut entries: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("read {}: {e}", dir.display()))
        .map(|e| e.expect("directory entry").path())
        .collect();
    entries.sort();
    for p in entries {
        if p.is_dir() {
            read_tree(root, &p, out);
        } else if p.extension().is_some_and(|e| e == "rs") {
            let rel = p
                .strip_prefix(root)
                .expect("under src")
                .to_string_lossy()
                .replace('\\', "/");
            let text =
                std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("read {}: {e}", p.display()));
            out.push((rel, text));
        }
    }
}

#[test]
fn tarpit_user_layers_have_no_cycles_and_only_kernel_uses_aya() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    read_tree(&src, &src, &mut files);
    let findings = check(&files);
    // `LAYERING_GRAPH=1 cargo test --test layering` lists every edge.
    if std::env::var_os("LAYERING_GRAPH").is_some() {
        for ((from, to), (site, n)) in &findings.edges {
            println!("{from} -> {to}: {site} ({n} in all)");
        }
    }
    let report = findings.report();
    assert!(
        report.is_empty(),
        "the module layering of tarpit-user is broken (see src/lib.rs for the \
         intended layers; cut one edge of each cycle):\n{report}"
    );
}

// The checker itself, on small in-memory crates.

fn fixture(files: &[(&str, &str)]) -> Findings {
    let files: Vec<(String, String)> = files
        .iter()
        .map(|(p, t)| (p.to_string(), t.to_string()))
        .collect();
    check(&files)
}

const LIB: &str = "pub mod low; pub mod high; pub mod kernel;";

#[test]
fn a_one_way_dependency_passes() {
    let f = fixture(&[
        ("lib.rs", LIB),
        ("low.rs", "pub fn f() {}"),
        ("high.rs", "use crate::low::f; pub fn g() { f() }"),
    ]);
    assert_eq!(f.report(), "");
    assert!(f.edges.contains_key(&("high".into(), "low".into())));
}

#[test]
fn an_inline_crate_path_in_code_closes_a_cycle() {
    // The deliberate violation: `low` reaches up with an inline path, no `use`.
    let f = fixture(&[
        ("lib.rs", LIB),
        ("low.rs", "pub fn f() -> u32 {\n    crate::high::g()\n}"),
        ("high.rs", "use crate::low::f;\npub fn g() -> u32 { 1 }"),
    ]);
    let r = f.report();
    assert!(r.contains("import cycle: high -> low -> high"), "{r}");
    assert!(
        r.contains("low -> high: src/low.rs:2 (crate::high::g)"),
        "{r}"
    );
    assert!(
        r.contains("high -> low: src/high.rs:1 (crate::low::f)"),
        "{r}"
    );
}

#[test]
fn inline_paths_in_types_patterns_and_macros_count() {
    for (n, body) in [
        "pub fn f(_: crate::high::T) {}",
        "pub fn f(x: u8) -> bool { matches!(x, crate::high::C) }",
        "pub fn f() { tracing::info!(n = crate::high::count(), \"x\"); }",
        "pub fn f() { println!(\"{}\", { let v = (crate :: high :: V); v }); }",
        "#[derive(serde::Deserialize)] pub struct S { #[serde(with = \"crate::high::ser\")] x: u8 }",
        "macro_rules! m { () => { $crate::high::f() } }",
        "pub fn f() { let crate::high::P(x) = make(); }",
    ]
    .into_iter()
    .enumerate()
    {
        let f = fixture(&[
            ("lib.rs", LIB),
            ("low.rs", body),
            ("high.rs", "pub fn g() { crate::low::f() }"),
        ]);
        assert!(
            f.report().contains("import cycle: high -> low -> high"),
            "case {n} not caught: {body}"
        );
    }
}

#[test]
fn super_paths_resolve_against_the_module_path() {
    // high/deep/mod.rs is high::deep; super::super:: is the crate root.
    let f = fixture(&[
        ("lib.rs", LIB),
        ("low/mod.rs", "pub mod inner;"),
        (
            "low/inner.rs",
            "pub fn f() {}\nmod tests {\n    use super::super::super::high::g;\n}",
        ),
        ("high/mod.rs", "pub mod deep;"),
        (
            "high/deep/mod.rs",
            "pub fn g() { super::super::low::inner::f() }",
        ),
    ]);
    let r = f.report();
    assert!(r.contains("import cycle: high -> low -> high"), "{r}");
    // `mod tests` is inline: its super::super::super is the root.
    assert!(r.contains("src/low/inner.rs:3"), "{r}");
    // super:: inside a module stays inside it: no edge.
    let f = fixture(&[
        ("lib.rs", LIB),
        ("low/mod.rs", "pub mod a; pub mod b;"),
        ("low/a.rs", "use super::b::x; use self::y::z;"),
        ("low/b.rs", "pub fn x() {}"),
    ]);
    assert!(f.edges.is_empty(), "{:?}", f.edges);
}

#[test]
fn use_groups_and_globs_count_each_branch() {
    let f = fixture(&[
        ("lib.rs", LIB),
        ("low.rs", "use crate::{kernel::K, high::*};"),
        ("high.rs", "use crate::low as l;"),
    ]);
    assert!(f.edges.contains_key(&("low".into(), "kernel".into())));
    assert!(f.report().contains("import cycle: high -> low -> high"));
}

#[test]
fn longer_cycles_are_reported_with_every_edge() {
    let lib = "pub mod a; pub mod b; pub mod c;";
    let f = fixture(&[
        ("lib.rs", lib),
        ("a.rs", "use crate::b::x;"),
        ("b.rs", "use crate::c::y;"),
        ("c.rs", "fn z() { crate::a::w(); }"),
    ]);
    let r = f.report();
    assert!(r.contains("import cycle: a -> b -> c -> a"), "{r}");
    assert!(r.contains("c -> a: src/c.rs:1 (crate::a::w)"), "{r}");
}

#[test]
fn aya_outside_kernel_fails_inside_kernel_passes() {
    let f = fixture(&[
        ("lib.rs", LIB),
        (
            "kernel.rs",
            "use aya::maps::HashMap; fn f() { aya_log::init(); }",
        ),
        ("low.rs", "fn f() {}"),
    ]);
    assert_eq!(f.report(), "");
    let f = fixture(&[
        ("lib.rs", LIB),
        ("kernel.rs", ""),
        ("low.rs", "fn f() {}"),
        (
            "high.rs",
            "fn f() {\n    let _ = aya::maps::MapInfo::from_pin(\"/x\");\n}",
        ),
    ]);
    let r = f.report();
    assert!(r.contains("aya outside `kernel`: src/high.rs:2"), "{r}");
    let f = fixture(&[("lib.rs", LIB), ("low.rs", "use aya::Ebpf;")]);
    assert!(f.report().contains("src/low.rs:1 (aya::Ebpf)"));
}
