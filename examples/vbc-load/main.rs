//! vbc-load: a block load generator built on libblkio (the `blkio` crate).
//!
//! It drives any vhost-user-blk server (`--socket`, driver
//! "virtio-blk-vhost-user": vblkcache, qemu-storage-daemon, ...) or a file or
//! block device (`--file`, driver "io_uring", O_DIRECT by default) with one
//! thread per queue, each keeping `--iodepth` requests in flight, and reports
//! IOPS, MiB/s and latency percentiles over the measured window (after
//! `--ramp`). All data buffers live in one blkio memory region, which the
//! vhost-user driver shares with the server.
//!
//!     cargo run --release --example vbc-load -- --socket /tmp/vbc.sock \
//!         --pattern randread --bs 4K --iodepth 32 --queues 2 --runtime 10s
//!
//! Modules: `hist` (latency histogram), `gen` (PRNG, offset distributions),
//! `verify` (--verify stamps), `worker` (the per-queue loop), `report`.

mod gen;
mod hist;
mod report;
mod verify;
mod worker;

use blkio::Blkio;
use clap::Parser;
use gen::{Dist, Offsets, Zipf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

#[derive(Parser, Debug)]
#[command(name = "vbc-load", about = "Block load generator on libblkio")]
pub struct Args {
    /// vhost-user-blk socket to connect to (driver virtio-blk-vhost-user)
    #[arg(long, conflicts_with = "file", required_unless_present = "file")]
    socket: Option<String>,
    /// File or block device to open with the io_uring driver
    #[arg(long)]
    file: Option<String>,
    /// With --file: use the page cache instead of O_DIRECT (tmpfs has no O_DIRECT)
    #[arg(long)]
    buffered: bool,
    /// randread, randwrite, read, write or randrw
    #[arg(long, default_value = "randread")]
    pattern: String,
    /// Percentage of reads for randrw
    #[arg(long, default_value_t = 50)]
    rwmix_read: u64,
    /// Request size
    #[arg(long, default_value = "4K", value_parser = vblkcache::size::clap_size)]
    bs: u64,
    /// Requests in flight per queue
    #[arg(long, default_value_t = 32)]
    iodepth: usize,
    /// Queues, one thread each
    #[arg(long, default_value_t = 1)]
    queues: usize,
    /// Measured time (e.g. 10s, 500ms, 2m)
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    runtime: Duration,
    /// Unmeasured warm-up time before the measured window
    #[arg(long, default_value = "1s", value_parser = parse_duration)]
    ramp: Duration,
    /// Bytes of the device to use, from offset 0 [default: whole device]
    #[arg(long, value_parser = vblkcache::size::clap_size)]
    size: Option<u64>,
    /// randrw: draw read offsets uniformly from the first SIZE bytes only (a
    /// hot set), writes still from the whole region [default: the region]
    #[arg(long, value_parser = vblkcache::size::clap_size)]
    read_size: Option<u64>,
    /// Offset distribution of random patterns: uniform or zipf:THETA (0<THETA<1)
    #[arg(long, default_value = "uniform")]
    dist: String,
    /// FLUSH after every N writes per queue (0 = never)
    #[arg(long, default_value_t = 0)]
    flush_every: u64,
    /// Stamp written data and check every stamped sector read back
    #[arg(long)]
    verify: bool,
    /// Sequential patterns: stop after one pass over the region (--runtime is then a limit)
    #[arg(long)]
    once: bool,
    /// Virtqueue size requested from a vhost-user server (power of two)
    #[arg(long, default_value_t = 256)]
    queue_size: i32,
    /// Fail when no request completes for this long
    #[arg(long, default_value = "30s", value_parser = parse_duration)]
    stall_timeout: Duration,
    /// Seed of the offset generator
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Print one JSON object instead of text
    #[arg(long)]
    json: bool,
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    let bad = || format!("'{s}' is not a duration (expected e.g. 10s, 500ms, 2m)");
    let split = s
        .find(|c: char| !c.is_ascii_digit() && c != '.')
        .unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let v: f64 = num.parse().map_err(|_| bad())?;
    let secs = match unit {
        "" | "s" => v,
        "ms" => v / 1000.0,
        "us" => v / 1e6,
        "m" => v * 60.0,
        _ => return Err(bad()),
    };
    if !secs.is_finite() || !(0.0..=86_400.0).contains(&secs) {
        return Err(bad());
    }
    Ok(Duration::from_secs_f64(secs))
}

/// The validated workload.
struct Plan {
    read_pct: u64,
    sequential: bool,
    dist: Dist,
}

fn plan(a: &Args) -> Result<Plan, String> {
    let (read_pct, sequential) = match a.pattern.as_str() {
        "randread" => (100, false),
        "randwrite" => (0, false),
        "read" => (100, true),
        "write" => (0, true),
        "randrw" => {
            if a.rwmix_read > 100 {
                return Err(format!("--rwmix-read {} is above 100", a.rwmix_read));
            }
            (a.rwmix_read, false)
        }
        p => return Err(format!("unknown --pattern '{p}'")),
    };
    if a.once && !sequential {
        return Err("--once needs a sequential pattern (read or write)".into());
    }
    let dist = match a.dist.as_str() {
        "uniform" => Dist::Uniform,
        d => match d.strip_prefix("zipf:").map(str::parse::<f64>) {
            // The Zipf table needs the block count; built later.
            Some(Ok(_)) => Dist::Uniform,
            _ => return Err(format!("unknown --dist '{d}' (uniform or zipf:THETA)")),
        },
    };
    if a.iodepth == 0 || a.iodepth > 4096 {
        return Err(format!("--iodepth {} must be 1..=4096", a.iodepth));
    }
    if a.queues == 0 || a.queues > 64 {
        return Err(format!("--queues {} must be 1..=64", a.queues));
    }
    if a.bs == 0 || a.bs > (64 << 20) {
        return Err(format!("--bs {} must be 1 byte..64M", a.bs));
    }
    Ok(Plan {
        read_pct,
        sequential,
        dist,
    })
}

fn berr(what: &str) -> impl Fn(blkio::Error) -> String + '_ {
    move |e| format!("{what}: {e} ({})", e.errno())
}

fn round_up(v: usize, to: usize) -> Option<usize> {
    v.checked_add(to - 1).map(|x| x / to * to)
}

fn run(a: &Args) -> Result<report::Summary, String> {
    let mut p = plan(a)?;
    let (driver, path) = match (&a.socket, &a.file) {
        (Some(s), None) => ("virtio-blk-vhost-user", s.as_str()),
        (None, Some(f)) => ("io_uring", f.as_str()),
        _ => return Err("give exactly one of --socket and --file".into()),
    };
    let mut b = Blkio::new(driver).map_err(berr("blkio_new"))?;
    b.set_str("path", path).map_err(berr("set path"))?;
    if a.file.is_some() {
        b.set_bool("direct", !a.buffered)
            .map_err(berr("set direct"))?;
    }
    b.connect().map_err(berr(&format!("connect to {path}")))?;
    let queues = i32::try_from(a.queues).map_err(|_| "too many queues")?;
    b.set_i32("num-queues", queues)
        .map_err(berr("set num-queues"))?;
    if a.socket.is_some() {
        b.set_i32("queue-size", a.queue_size)
            .map_err(berr("set queue-size"))?;
    } else {
        let entries = a.iodepth.next_power_of_two().max(128);
        b.set_i32("num-entries", entries as i32)
            .map_err(berr("set num-entries"))?;
    }
    let started = b.start().map_err(berr("start"))?;
    let capacity = b.get_u64("capacity").map_err(berr("capacity"))?;
    let req_align = b
        .get_i32("request-alignment")
        .map_err(berr("request-alignment"))?;
    let region_align = b
        .get_u64("mem-region-alignment")
        .map_err(berr("mem-region-alignment"))?;
    let max_seg = b
        .get_i32("max-segment-len")
        .map_err(berr("max-segment-len"))?;
    let max_segs = b.get_i32("max-segments").map_err(berr("max-segments"))?;

    let bs = a.bs;
    if req_align > 0 && bs % req_align as u64 != 0 {
        return Err(format!(
            "--bs {bs} is not a multiple of the device's request alignment {req_align}"
        ));
    }
    if a.verify && bs % verify::SECTOR as u64 != 0 {
        return Err(format!(
            "--verify needs --bs a multiple of {}",
            verify::SECTOR
        ));
    }
    let size = a.size.unwrap_or(capacity);
    if size > capacity {
        return Err(format!(
            "--size {size} is larger than the device ({capacity} bytes)"
        ));
    }
    let blocks = size / bs;
    if blocks < a.queues as u64 {
        return Err(format!(
            "region of {size} bytes holds {blocks} blocks of {bs}, fewer than the queues"
        ));
    }
    if let Some(t) = a.dist.strip_prefix("zipf:") {
        let theta: f64 = t.parse().map_err(|_| format!("bad zipf theta '{t}'"))?;
        p.dist = Dist::Zipf(Arc::new(Zipf::new(blocks, theta)?));
    }
    let read_blocks = match a.read_size {
        None => 0,
        Some(_) if p.sequential || p.read_pct == 0 || p.read_pct == 100 || a.verify => {
            return Err("--read-size needs --pattern randrw (and no --verify)".into())
        }
        Some(r) if r / bs == 0 || r > size => {
            return Err(format!(
                "--read-size {r} must hold a block and fit in the region"
            ))
        }
        Some(r) => r / bs,
    };
    let bs_usize = usize::try_from(bs).map_err(|_| "bs too large")?;
    let max_seg = usize::try_from(max_seg.max(0)).unwrap_or(0);
    let nseg = if max_seg == 0 {
        1
    } else {
        bs_usize.div_ceil(max_seg)
    };
    if max_segs > 0 && nseg > max_segs as usize {
        return Err(format!(
            "--bs {bs} needs {nseg} segments of {max_seg} bytes; the device takes at most {max_segs}"
        ));
    }
    if a.socket.is_some() {
        let descs = a.iodepth.saturating_mul(nseg + 2);
        if descs > a.queue_size as usize {
            eprintln!(
                "vbc-load: warning: iodepth {} x {} descriptors exceeds --queue-size {}; \
                 requests will wait in libblkio and the real depth is lower",
                a.iodepth,
                nseg + 2,
                a.queue_size
            );
        }
    }

    // One memory region for all queues; each queue gets a page-aligned part.
    let per_q = round_up(a.iodepth * bs_usize, 4096).ok_or("buffer size overflows")?;
    let total = per_q
        .checked_mul(a.queues)
        .and_then(|t| round_up(t, region_align.max(1) as usize))
        .ok_or("buffer size overflows")?;
    let region = b
        .alloc_mem_region(total)
        .map_err(berr("alloc_mem_region"))?;
    b.map_mem_region(&region).map_err(berr("map_mem_region"))?;

    let start = Instant::now();
    let ramp_end = start + a.ramp;
    let end = ramp_end + a.runtime;
    let mut cpu_s = None;
    let results: Vec<Result<worker::QueueStats, String>> = std::thread::scope(|s| {
        // Samples this process's CPU time at both edges of the window; the
        // second sample is taken early when the workers finish first (a
        // --once pass), which drops `done_tx`.
        let (done_tx, done_rx) = std::sync::mpsc::channel::<()>();
        let sampler = s.spawn(move || {
            let _ = done_rx.recv_timeout(ramp_end.saturating_duration_since(Instant::now()));
            let a = process_cpu_s()?;
            let _ = done_rx.recv_timeout(end.saturating_duration_since(Instant::now()));
            let b = process_cpu_s()?;
            Some(report::Cpu {
                total_s: b.total_s - a.total_s,
                sys_s: b.sys_s - a.sys_s,
            })
        });
        let handles: Vec<_> = started
            .queues
            .into_iter()
            .enumerate()
            .map(|(i, mut q)| {
                // SAFETY: the region is `total` >= queues * per_q bytes, mapped
                // above and freed only after this scope joins every thread;
                // queue i gets the disjoint range [i * per_q, (i+1) * per_q).
                let mem = unsafe {
                    worker::QueueMem::new((region.addr as *mut u8).add(i * per_q), per_q)
                };
                let offsets = Offsets::new(
                    bs,
                    blocks,
                    p.dist.clone(),
                    p.sequential,
                    a.verify,
                    i as u64,
                    a.queues as u64,
                );
                let cfg = worker::WorkerCfg {
                    bs: bs_usize,
                    iodepth: a.iodepth,
                    read_pct: p.read_pct,
                    read_blocks,
                    flush_every: a.flush_every,
                    verify: a.verify,
                    once: a.once,
                    seed: a
                        .seed
                        .wrapping_add((i as u64).wrapping_mul(0x1234_5678_9ABC)),
                    ramp_end,
                    end,
                    stall: a.stall_timeout,
                    max_seg,
                };
                s.spawn(move || worker::run(&mut q, mem, offsets, &cfg))
            })
            .collect();
        let r = handles
            .into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|_| Err("worker thread panicked".into()))
            })
            .collect();
        drop(done_tx);
        cpu_s = sampler.join().ok().flatten();
        r
    });
    b.unmap_mem_region(&region);
    b.free_mem_region(&region);

    let mut stats = Vec::new();
    for (i, r) in results.into_iter().enumerate() {
        stats.push(r.map_err(|e| format!("queue {i}: {e}"))?);
    }
    // With --once the window ends when the last queue finished its pass.
    let window_end = if a.once {
        stats
            .iter()
            .filter_map(|s| s.finished_at)
            .max()
            .map_or(end, |t| t.min(end))
    } else {
        end
    };
    let window = window_end.saturating_duration_since(ramp_end);
    let info = report::Run {
        driver,
        path,
        capacity,
        region: size,
        window,
        cpu_s,
    };
    Ok(report::Summary::new(a, info, &stats))
}

/// CPU seconds of this process so far: user + system, and system alone.
fn process_cpu_s() -> Option<report::Cpu> {
    // SAFETY: an all-zero rusage is a valid value of this plain C struct.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: getrusage writes only into the struct we pass.
    let rc = unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut ru) };
    if rc != 0 {
        return None;
    }
    let tv = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    Some(report::Cpu {
        total_s: tv(ru.ru_utime) + tv(ru.ru_stime),
        sys_s: tv(ru.ru_stime),
    })
}

fn main() -> ExitCode {
    let a = Args::parse();
    match run(&a) {
        Ok(sum) => {
            if a.json {
                println!("{}", sum.json());
            } else {
                print!("{}", sum.text());
            }
            if sum.failed() {
                ExitCode::from(1)
            } else {
                ExitCode::SUCCESS
            }
        }
        Err(e) => {
            eprintln!("vbc-load: {e}");
            ExitCode::from(2)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("10s").unwrap(), Duration::from_secs(10));
        assert_eq!(parse_duration("500ms").unwrap(), Duration::from_millis(500));
        assert_eq!(parse_duration("2m").unwrap(), Duration::from_secs(120));
        assert_eq!(parse_duration("3").unwrap(), Duration::from_secs(3));
        assert!(parse_duration("s").is_err());
        assert!(parse_duration("10h").is_err());
        assert!(parse_duration("-1s").is_err());
    }
}
