//! The report written for people (`vblkcache check` without `--json`).

use super::{JournalEnd, Report};

/// Writes the report for humans.
pub fn write_human(r: &Report, out: &mut dyn std::io::Write) -> std::io::Result<()> {
    writeln!(out, "cache device {} ({} bytes)", r.device, r.device_size)?;
    for (i, s) in r.slots.iter().enumerate() {
        match (&s.error, s.seq) {
            (None, Some(seq)) => writeln!(
                out,
                "  superblock slot {i}: valid, seq {seq}, {}",
                if s.clean == Some(true) {
                    "clean"
                } else {
                    "in use or crashed"
                }
            )?,
            (e, _) => writeln!(
                out,
                "  superblock slot {i}: invalid ({})",
                e.as_deref().unwrap_or("?")
            )?,
        }
    }
    if let Some(sb) = &r.superblock {
        writeln!(
            out,
            "  using slot {}: format version {}, mode {}, {} blocks of {} bytes, associativity {}, span {}, source {} bytes, {}",
            sb.slot,
            sb.format_version,
            sb.mode,
            sb.cache_blocks,
            sb.block_size,
            sb.assoc,
            sb.span,
            sb.source_size,
            if sb.clean { "clean shutdown" } else { "not shut down cleanly" }
        )?;
        if let Some(src) = &sb.source {
            writeln!(out, "  belongs to {src}")?;
        }
    }
    if let Some(j) = &r.journal {
        writeln!(
            out,
            "  journal: {} commits ({} records) from offset {} (seq {}), stops at offset {}: {}{}",
            j.commits,
            j.records,
            j.start_pos,
            j.start_seq,
            j.end_pos,
            match j.end {
                JournalEnd::End => "end of the log",
                JournalEnd::TornTail => "torn tail (a commit cut short by a crash; ignored)",
                JournalEnd::Full => "end of the journal area",
                JournalEnd::Corrupt => "damaged block before newer commits",
            },
            if j.replayed_on_start {
                ""
            } else {
                " (not replayed: clean shutdown)"
            }
        )?;
    }
    if let Some(t) = &r.table {
        writeln!(
            out,
            "  table: {} pages ({} bad), {} valid / {} dirty entries stored, {} valid / {} dirty after recovery",
            t.pages, t.bad_pages, t.stored.valid, t.stored.dirty, t.recovered.valid, t.recovered.dirty
        )?;
    }
    for p in &r.problems {
        let area = serde_json::to_value(p.area)
            .ok()
            .and_then(|v| v.as_str().map(String::from))
            .unwrap_or_default();
        writeln!(
            out,
            "  PROBLEM ({area}{}): {}",
            if p.repairable {
                ", repairable with --repair"
            } else {
                ""
            },
            p.what
        )?;
    }
    if let Some(t) = &r.table {
        if t.unlisted_problems > 0 {
            writeln!(out, "  ... and {} more entry problems", t.unlisted_problems)?;
        }
    }
    for fix in &r.repairs {
        writeln!(out, "  REPAIRED: {fix}")?;
    }
    writeln!(
        out,
        "{}",
        if r.consistent {
            "consistent"
        } else {
            "NOT consistent"
        }
    )
}
