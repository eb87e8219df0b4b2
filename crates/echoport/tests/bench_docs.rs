//! The load generator's documentation names only flags that exist: the Kubernetes manifest
//! in `dist/k8s` and the "Load generator: merge, intervals, churn, UDP" section of
//! docs/BENCHMARKS.md, checked against `echoport bench --help` and `bench merge --help`.

mod bench_common;

use std::collections::BTreeSet;
use std::process::Command;

use bench_common::BIN;

fn help(args: &[&str]) -> String {
    let out = Command::new(BIN).args(args).output().expect("run echoport");
    assert!(out.status.success(), "{args:?}");
    String::from_utf8(out.stdout).unwrap()
}

/// Every `--long-flag` in `text`.
fn flags(text: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let b = text.as_bytes();
    let mut i = 0;
    while let Some(at) = text[i..].find("--") {
        let start = i + at;
        let mut end = start + 2;
        while end < b.len() && (b[end].is_ascii_lowercase() || b[end] == b'-') {
            end += 1;
        }
        let before_ok =
            start == 0 || !(b[start - 1].is_ascii_alphanumeric() || b[start - 1] == b'-');
        if before_ok && end > start + 3 {
            out.insert(text[start..end].trim_end_matches('-').to_string());
        }
        i = end;
    }
    out
}

fn root(path: &str) -> String {
    let p = format!("{}/../../{path}", env!("CARGO_MANIFEST_DIR"));
    std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("{p}: {e}"))
}

#[test]
fn the_manifest_and_the_docs_name_only_real_flags() {
    let mut real = flags(&help(&["bench", "--help"]));
    real.extend(flags(&help(&["bench", "merge", "--help"])));
    // serve's UDP limits, and the tools the recipes call.
    real.extend(flags(&help(&["serve", "--help"])));
    // kubectl wait --for (its --timeout and parallel's --tag happen to be bench flags too).
    let others = ["--for"];
    assert!(
        flags("a --bogus-flag, b --x").contains("--bogus-flag"),
        "the scan finds flags"
    );
    let docs = root("docs/BENCHMARKS.md");
    let section = docs
        .split("## Load generator: merge, intervals, churn, UDP")
        .nth(1)
        .expect("the section exists")
        .split("\n## ")
        .next()
        .unwrap();
    for (name, text) in [
        (
            "dist/k8s/bench-indexed-job.yaml",
            root("dist/k8s/bench-indexed-job.yaml"),
        ),
        ("the docs section", section.to_string()),
    ] {
        let named = flags(&text);
        assert!(named.len() > 5, "{name}: {named:?}");
        for f in named {
            assert!(
                real.contains(&f) || others.contains(&f.as_str()),
                "{name} names {f}, which no --help lists"
            );
        }
    }
    for f in ["--start-at", "--tag", "--json", "--hlog"] {
        assert!(
            root("dist/k8s/bench-indexed-job.yaml").contains(f),
            "the manifest uses {f}"
        );
    }
}
