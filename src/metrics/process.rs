//! What the kernel says about this process, read at each scrape from `/proc/self`: its CPU and
//! memory (the standard `process_*` names), and CPU per thread name (`ingress-0`, `ingress-1`, …
//! for the ingress cores; `pool` for the store and delivery runtime), so a dashboard shows how
//! busy each core is. Nothing is emitted where `/proc` can't be read.

use std::fmt::Write as _;

/// Clock ticks per second of `/proc/*/stat` times (USER_HZ).
fn ticks_per_second() -> f64 {
    // SAFETY: sysconf only reads a configuration value.
    match unsafe { libc::sysconf(libc::_SC_CLK_TCK) } {
        n if n > 0 => n as f64,
        _ => 100.0,
    }
}

/// Bytes per page of `/proc/*/statm` (4 KiB on x86-64; 16 or 64 KiB on some arm64 kernels).
fn page_bytes() -> u64 {
    // SAFETY: sysconf only reads a configuration value.
    match unsafe { libc::sysconf(libc::_SC_PAGESIZE) } {
        n if n > 0 => n as u64,
        _ => 4096,
    }
}

/// utime + stime of a `/proc/*/stat` line, in ticks: fields 14 and 15, counted after the
/// parenthesized command name (which may itself hold spaces or parentheses).
fn cpu_ticks(stat: &str) -> Option<u64> {
    let rest = &stat[stat.rfind(')')? + 1..];
    let mut fields = rest.split_whitespace().skip(11);
    let user: u64 = fields.next()?.parse().ok()?;
    let system: u64 = fields.next()?.parse().ok()?;
    Some(user + system)
}

/// Append the process and per-thread lines to `out`.
pub fn render(out: &mut String) {
    if let Some(ticks) = std::fs::read_to_string("/proc/self/stat")
        .ok()
        .and_then(|s| cpu_ticks(&s))
    {
        let _ = writeln!(
            out,
            "# HELP process_cpu_seconds_total User and system CPU time of the process.\n\
             # TYPE process_cpu_seconds_total counter\n\
             process_cpu_seconds_total {}",
            ticks as f64 / ticks_per_second()
        );
    }
    if let Some(rss) = std::fs::read_to_string("/proc/self/statm")
        .ok()
        .and_then(|s| s.split_whitespace().nth(1)?.parse::<u64>().ok())
    {
        let page = page_bytes();
        let _ = writeln!(
            out,
            "# HELP process_resident_memory_bytes Resident memory of the process.\n\
             # TYPE process_resident_memory_bytes gauge\n\
             process_resident_memory_bytes {}",
            rss * page
        );
    }
    let Ok(tasks) = std::fs::read_dir("/proc/self/task") else {
        return;
    };
    let mut by_name: std::collections::BTreeMap<String, u64> = Default::default();
    for task in tasks.flatten() {
        let path = task.path();
        let (Ok(name), Ok(stat)) = (
            std::fs::read_to_string(path.join("comm")),
            std::fs::read_to_string(path.join("stat")),
        ) else {
            continue;
        };
        if let Some(ticks) = cpu_ticks(&stat) {
            *by_name.entry(name.trim().to_string()).or_default() += ticks;
        }
    }
    let _ = writeln!(
        out,
        "# HELP triggers_thread_cpu_seconds_total CPU time by thread name (ingress-N: ingress core N; commit: the group commit; pool: the rest of the store, and delivery).\n\
         # TYPE triggers_thread_cpu_seconds_total counter"
    );
    for (name, ticks) in by_name {
        // Thread names are ours or the runtime's: plain ASCII; anything else is left out.
        if name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        {
            let _ = writeln!(
                out,
                "triggers_thread_cpu_seconds_total{{thread=\"{name}\"}} {}",
                ticks as f64 / ticks_per_second()
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_ticks_reads_utime_and_stime_after_the_command_name() {
        let stat = "4242 (a (weird) name) S 1 4242 4242 0 -1 4194560 100 0 0 0 37 5 0 0 20 0 1 0";
        assert_eq!(cpu_ticks(stat), Some(42));
        assert_eq!(cpu_ticks("garbage"), None);
        assert_eq!(cpu_ticks("1 (x) S 1"), None);
    }

    #[test]
    fn this_process_is_rendered_with_its_threads() {
        let mut out = String::new();
        render(&mut out);
        assert!(out.contains("process_cpu_seconds_total "), "{out}");
        assert!(out.contains("process_resident_memory_bytes "), "{out}");
        assert!(
            out.contains("triggers_thread_cpu_seconds_total{thread="),
            "{out}"
        );
    }
}
