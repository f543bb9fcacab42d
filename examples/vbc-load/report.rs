//! Merging per-queue results and printing them as text or JSON.

use crate::hist::Hist;
use crate::worker::QueueStats;
use crate::Args;
use serde_json::{json, Value};
use std::fmt::Write;
use std::time::Duration;

/// Facts about the run other than the per-queue stats.
pub struct Run<'a> {
    pub driver: &'a str,
    pub path: &'a str,
    /// Device size in bytes.
    pub capacity: u64,
    /// Bytes of the device used.
    pub region: u64,
    /// The measured window.
    pub window: Duration,
    /// This process's CPU seconds inside the window.
    pub cpu_s: Option<Cpu>,
}

/// CPU time of this process over an interval.
#[derive(Clone, Copy, Debug)]
pub struct Cpu {
    /// User + system seconds.
    pub total_s: f64,
    /// System (kernel) seconds alone.
    pub sys_s: f64,
}

/// Everything printed at the end of a run.
pub struct Summary {
    target: String,
    driver: String,
    pattern: String,
    bs: u64,
    iodepth: usize,
    queues: usize,
    dist: String,
    flush_every: u64,
    capacity: u64,
    region: u64,
    window: Duration,
    read: Hist,
    write: Hist,
    flush: Hist,
    read_bytes: u64,
    write_bytes: u64,
    errors: u64,
    first_error: Option<String>,
    total_ios: u64,
    /// This process's CPU seconds inside the window.
    cpu_s: Option<Cpu>,
    verify: bool,
    verify_failures: u64,
    first_verify_failure: Option<String>,
}

fn lat_json(h: &Hist) -> Value {
    json!({
        "count": h.count(),
        "mean_us": round2(h.mean_us()),
        "p50_us": round2(h.percentile_us(50.0)),
        "p99_us": round2(h.percentile_us(99.0)),
        "max_us": round2(h.max_us()),
    })
}

fn round6(v: f64) -> f64 {
    (v * 1e6).round() / 1e6
}

fn round2(v: f64) -> f64 {
    (v * 100.0).round() / 100.0
}

impl Summary {
    pub fn new(a: &Args, run: Run<'_>, stats: &[QueueStats]) -> Summary {
        let Run {
            driver,
            path,
            capacity,
            region,
            window,
            cpu_s,
        } = run;
        let mut s = Summary {
            target: path.to_string(),
            driver: driver.to_string(),
            pattern: a.pattern.clone(),
            bs: a.bs,
            iodepth: a.iodepth,
            queues: a.queues,
            dist: a.dist.clone(),
            flush_every: a.flush_every,
            capacity,
            region,
            window,
            read: Hist::default(),
            write: Hist::default(),
            flush: Hist::default(),
            read_bytes: 0,
            write_bytes: 0,
            errors: 0,
            first_error: None,
            total_ios: 0,
            cpu_s,
            verify: a.verify,
            verify_failures: 0,
            first_verify_failure: None,
        };
        for q in stats {
            s.read.merge(&q.read);
            s.write.merge(&q.write);
            s.flush.merge(&q.flush);
            s.read_bytes += q.read_bytes;
            s.write_bytes += q.write_bytes;
            s.errors += q.errors;
            s.total_ios += q.total_ios;
            s.verify_failures += q.verify_failures;
            if s.first_error.is_none() {
                s.first_error.clone_from(&q.first_error);
            }
            if s.first_verify_failure.is_none() {
                s.first_verify_failure.clone_from(&q.first_verify_failure);
            }
        }
        s
    }

    /// Errors or verification failures happened.
    pub fn failed(&self) -> bool {
        self.errors > 0 || self.verify_failures > 0
    }

    fn secs(&self) -> f64 {
        self.window.as_secs_f64()
    }

    /// Data requests (reads and writes; flushes are reported apart).
    fn data(&self) -> Hist {
        let mut h = self.read.clone();
        h.merge(&self.write);
        h
    }

    fn rate(&self, n: u64) -> f64 {
        if self.secs() > 0.0 {
            n as f64 / self.secs()
        } else {
            0.0
        }
    }

    pub fn json(&self) -> Value {
        let data = self.data();
        let bytes = self.read_bytes + self.write_bytes;
        json!({
            "target": self.target,
            "driver": self.driver,
            "pattern": self.pattern,
            "bs": self.bs,
            "iodepth": self.iodepth,
            "queues": self.queues,
            "dist": self.dist,
            "flush_every": self.flush_every,
            "capacity": self.capacity,
            "region": self.region,
            "window_s": round2(self.secs()),
            "ios": data.count(),
            "iops": round2(self.rate(data.count())),
            "mib_s": round2(self.rate(bytes) / 1048576.0),
            "lat": lat_json(&data),
            "read": lat_json(&self.read),
            "write": lat_json(&self.write),
            "flush": lat_json(&self.flush),
            "total_ios": self.total_ios,
            "client_cpu_s": self.cpu_s.map(|c| round6(c.total_s)),
            "client_cpu_us_per_io": self.cpu_s.filter(|_| data.count() > 0)
                .map(|c| round2(c.total_s * 1e6 / data.count() as f64)),
            "client_sys_s": self.cpu_s.map(|c| round6(c.sys_s)),
            "client_sys_us_per_io": self.cpu_s.filter(|_| data.count() > 0)
                .map(|c| round2(c.sys_s * 1e6 / data.count() as f64)),
            "errors": self.errors,
            "first_error": self.first_error,
            "verify": self.verify,
            "verify_failures": self.verify_failures,
            "first_verify_failure": self.first_verify_failure,
        })
    }

    pub fn text(&self) -> String {
        let data = self.data();
        let bytes = self.read_bytes + self.write_bytes;
        let mut o = String::new();
        let _ = writeln!(
            o,
            "{} ({}): {} bs={} iodepth={} queues={} dist={} flush_every={} region={} MiB of {} MiB",
            self.target,
            self.driver,
            self.pattern,
            self.bs,
            self.iodepth,
            self.queues,
            self.dist,
            self.flush_every,
            self.region >> 20,
            self.capacity >> 20
        );
        let _ = writeln!(
            o,
            "  window {:.2} s: {} I/Os, {:.0} IOPS, {:.1} MiB/s",
            self.secs(),
            data.count(),
            self.rate(data.count()),
            self.rate(bytes) / 1048576.0
        );
        for (name, h) in [
            ("all", &data),
            ("read", &self.read),
            ("write", &self.write),
            ("flush", &self.flush),
        ] {
            if h.count() == 0 || ((name == "read" || name == "write") && h.count() == data.count())
            {
                continue;
            }
            let _ = writeln!(
                o,
                "  {name:>5} lat (us): n={} mean={:.1} p50={:.1} p99={:.1} max={:.1}",
                h.count(),
                h.mean_us(),
                h.percentile_us(50.0),
                h.percentile_us(99.0),
                h.max_us()
            );
        }
        if let Some(c) = self.cpu_s.filter(|_| data.count() > 0) {
            let _ = writeln!(
                o,
                "  client CPU: {:.3} s in the window ({:.3} s kernel), {:.2} us per I/O ({:.2} kernel)",
                c.total_s,
                c.sys_s,
                c.total_s * 1e6 / data.count() as f64,
                c.sys_s * 1e6 / data.count() as f64
            );
        }
        let _ = writeln!(o, "  errors: {}", self.errors);
        if let Some(e) = &self.first_error {
            let _ = writeln!(o, "  first error: {e}");
        }
        if self.verify {
            let _ = writeln!(o, "  verify failures: {}", self.verify_failures);
            if let Some(e) = &self.first_verify_failure {
                let _ = writeln!(o, "  first verify failure: {e}");
            }
        }
        o
    }
}
