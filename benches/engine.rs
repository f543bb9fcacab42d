//! Engine micro-benchmarks (plain std timing, no harness).
//!
//! `cargo bench --bench engine -- [--quick] [--json] [--json-out FILE] [--only SECTION,...]
//! [--filter SUBSTRING]`
//! Sections: hit, miss, writeback, meta; `--filter` keeps only the hit,
//! miss and writeback cases whose label contains the substring. Every timed case is repeated and
//! reported as median [min .. max]. Checks made along the way (every measured
//! read was a hit, every cold read was a miss, the data written back arrived)
//! are printed; a failed check makes the exit status 1.

#[path = "engine/common.rs"]
mod common;
#[path = "engine/hit.rs"]
mod hit;
#[path = "engine/meta.rs"]
mod meta;
#[path = "engine/miss.rs"]
mod miss;
#[path = "engine/writeback.rs"]
mod writeback;

use common::{fmt_num, Opts, Report, R};
use std::path::Path;
use std::time::Instant;

fn parse_args() -> R<Opts> {
    let mut opts = Opts {
        quick: false,
        json: false,
        only: Vec::new(),
        filter: None,
        json_out: None,
    };
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--quick" => opts.quick = true,
            "--json" => opts.json = true,
            "--only" => {
                let v = args.next().ok_or("--only needs a list of sections")?;
                opts.only = v.split(',').map(str::to_string).collect();
            }
            "--json-out" => {
                opts.json_out = Some(args.next().ok_or("--json-out needs a file name")?);
            }
            "--filter" => {
                opts.filter = Some(args.next().ok_or("--filter needs a substring")?);
            }
            // cargo bench passes --bench to harness-less benchmarks.
            "--bench" => {}
            "--help" | "-h" => {
                println!("engine [--quick] [--json] [--only hit,miss,writeback,meta] [--filter SUBSTRING] [--json-out FILE]");
                std::process::exit(0);
            }
            other => return Err(format!("unknown argument {other:?} (try --help)").into()),
        }
    }
    for s in &opts.only {
        if !["hit", "miss", "writeback", "meta"].contains(&s.as_str()) {
            return Err(format!("unknown section {s:?}").into());
        }
    }
    Ok(opts)
}

/// nproc, CPU model and kernel, for the record.
fn machine() -> Vec<(String, String)> {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpuinfo
        .lines()
        .find_map(|l| l.strip_prefix("model name"))
        .map(|v| v.trim_start_matches([' ', '\t', ':']).to_string())
        .unwrap_or_else(|| String::from("unknown"));
    let cpus = std::thread::available_parallelism().map_or(0, |n| n.get());
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let mem = std::fs::read_to_string("/proc/meminfo")
        .unwrap_or_default()
        .lines()
        .next()
        .unwrap_or_default()
        .split_whitespace()
        .nth(1)
        .and_then(|k| k.parse::<u64>().ok())
        .map_or(String::from("unknown"), |k| format!("{} GiB", k >> 20));
    vec![
        (String::from("cpus"), cpus.to_string()),
        (String::from("cpu model"), model),
        (String::from("memory"), mem),
        (String::from("kernel"), kernel.trim().to_string()),
    ]
}

fn print_table(report: &Report) {
    let mut section = "";
    for r in &report.rows {
        if r.section != section {
            section = r.section;
            println!("\n== {section} ==");
            println!(
                "{:<44} {:<32} {:>12} {:<6} {:>12} {:>12} {:>7}  note",
                "case", "metric", "median", "unit", "min", "max", "spread"
            );
        }
        println!(
            "{:<44} {:<32} {:>12} {:<6} {:>12} {:>12} {:>6.1}%  {}",
            r.case,
            r.metric,
            fmt_num(r.summary.median),
            r.unit,
            fmt_num(r.summary.min),
            fmt_num(r.summary.max),
            r.summary.spread_pct(),
            r.note
        );
    }
    if !report.facts.is_empty() {
        println!("\n== facts ==");
        for (k, v) in &report.facts {
            println!("{k}: {v}");
        }
    }
    println!("\n== checks ==");
    for c in &report.checks {
        println!(
            "[{}] {}: {}",
            if c.ok { "ok" } else { "FAILED" },
            c.section,
            c.what
        );
    }
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.get(1).map(String::as_str) == Some(meta::CHILD_ARG) {
        let r = match (args.get(2), args.get(3)) {
            (Some(c), Some(s)) => meta::child(Path::new(c), Path::new(s)),
            _ => Err("usage: --meta-child CACHE SOURCE".into()),
        };
        if let Err(e) = r {
            eprintln!("meta child: {e}");
            std::process::exit(2);
        }
        return;
    }
    let opts = match parse_args() {
        Ok(o) => o,
        Err(e) => {
            eprintln!("engine bench: {e}");
            std::process::exit(2);
        }
    };
    let mut report = Report {
        verbose: !opts.json,
        ..Report::default()
    };
    let t0 = Instant::now();
    type Section = fn(&Opts, &mut Report) -> R<()>;
    let sections: [(&str, Section); 4] = [
        ("hit", hit::run),
        ("miss", miss::run_all),
        ("writeback", writeback::run),
        ("meta", meta::run),
    ];
    let mut failed = None;
    let mut timing = Vec::new();
    for (name, f) in sections {
        if !opts.wants(name) {
            continue;
        }
        if !opts.json {
            eprintln!("-- {name}");
        }
        let t = Instant::now();
        if let Err(e) = f(&opts, &mut report) {
            eprintln!("engine bench: section {name} failed: {e}");
            failed = Some(format!("{name}: {e}"));
            break;
        }
        timing.push((name, t.elapsed().as_secs_f64()));
    }
    let total = t0.elapsed().as_secs_f64();
    let ok = failed.is_none() && report.checks.iter().all(|c| c.ok);
    let doc = serde_json::json!({
        "quick": opts.quick,
        "unix_time": std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs()),
        "machine": machine().into_iter().collect::<std::collections::BTreeMap<_, _>>(),
        "section_seconds": timing.iter().map(|(n, s)| (n.to_string(), *s)).collect::<std::collections::BTreeMap<_, _>>(),
        "total_seconds": total,
        "report": &report,
        "error": failed,
        "all_checks_ok": ok,
    });
    let text = serde_json::to_string_pretty(&doc)
        .unwrap_or_else(|e| format!("{{\"error\": \"json: {e}\"}}"));
    if let Some(path) = &opts.json_out {
        if let Err(e) = std::fs::write(path, &text) {
            eprintln!("engine bench: writing {path}: {e}");
        }
    }
    if opts.json {
        println!("{text}");
    } else {
        println!("== machine ==");
        for (k, v) in machine() {
            println!("{k}: {v}");
        }
        println!("mode: {}", if opts.quick { "quick" } else { "full" });
        print_table(&report);
        for (n, s) in &timing {
            println!("section {n}: {s:.1}s");
        }
        println!(
            "total: {total:.1}s; checks {}",
            if ok { "all ok" } else { "FAILED" }
        );
    }
    if !ok {
        std::process::exit(1);
    }
}
