//! What the benchmark tools share: medians and CPU time read from /proc.
//!
//! `vhostbox-bench` (blk against qemu-storage-daemon, libblkio as the client) and
//! `vhostbox-netbench` (net against DPDK testpmd's vhost PMD, the test frontend as the client)
//! are tools, not tests: they print figures and ratios and never judge them.

use std::fs;

/// The median (the upper one of an even count); NaN for no values.
pub fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
}

/// CPU time (user + system) of one process, all its threads, in seconds.
pub fn cpu_secs(pid: u32) -> f64 {
    let s = fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let rest = s.rsplit_once(") ").map_or("", |x| x.1);
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    // Fields after the command: state is [0]; utime is field 14 of the line, [11] here.
    // USER_HZ is 100 on Linux.
    (ticks(11) + ticks(12)) / 100.0
}

/// CPU time of `pid` and all its descendants (a supervisor and its workers), in seconds.
pub fn tree_cpu(pid: u32) -> f64 {
    let mut total = 0.0;
    let mut stack = vec![pid];
    while let Some(p) = stack.pop() {
        total += cpu_secs(p);
        if let Ok(tasks) = fs::read_dir(format!("/proc/{p}/task")) {
            for t in tasks.flatten() {
                let kids = fs::read_to_string(t.path().join("children")).unwrap_or_default();
                stack.extend(
                    kids.split_whitespace()
                        .filter_map(|k| k.parse::<u32>().ok()),
                );
            }
        }
    }
    total
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn median_of_odd_even_and_none() {
        assert_eq!(median(vec![3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(vec![4.0, 1.0, 3.0, 2.0]), 3.0);
        assert!(median(vec![]).is_nan());
    }

    #[test]
    fn this_process_has_used_cpu() {
        let mut x = 0u64;
        for i in 0..20_000_000u64 {
            x = x.wrapping_mul(31).wrapping_add(i);
        }
        std::hint::black_box(x);
        assert!(tree_cpu(std::process::id()) > 0.0);
    }
}
