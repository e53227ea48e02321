//! CPU time and resident memory of the server processes under test, read
//! from /proc, so CPU per delivered message and memory per connection can
//! be compared between a gateway (its process plus the broker's) and
//! Web-STOMP (inside the broker).

use std::fs;

use anyhow::{anyhow, Context};
use serde_json::{json, Map, Value};

/// A process named on the command line as `name=pid`.
#[derive(Clone, Debug)]
pub struct Watched {
    pub name: String,
    pub pid: u32,
}

impl std::str::FromStr for Watched {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (name, pid) = s
            .split_once('=')
            .ok_or_else(|| format!("{s:?}: expected NAME=PID, e.g. broker=1234"))?;
        let pid = pid
            .parse()
            .map_err(|_| format!("{s:?}: {pid:?} is not a process id"))?;
        Ok(Watched {
            name: name.to_owned(),
            pid,
        })
    }
}

/// CPU seconds and resident KiB of each watched process at one moment.
#[derive(Clone, Debug)]
pub struct Sample {
    pub cpu_seconds: Vec<f64>,
    pub rss_kib: Vec<u64>,
}

pub fn sample(watched: &[Watched]) -> anyhow::Result<Sample> {
    let mut cpu_seconds = Vec::with_capacity(watched.len());
    let mut rss_kib = Vec::with_capacity(watched.len());
    for w in watched {
        cpu_seconds.push(cpu(w.pid).with_context(|| format!("CPU time of {}", w.name))?);
        rss_kib.push(rss(w.pid).with_context(|| format!("memory of {}", w.name))?);
    }
    Ok(Sample {
        cpu_seconds,
        rss_kib,
    })
}

/// user + system time of all the process's threads.
fn cpu(pid: u32) -> anyhow::Result<f64> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // The command name may hold spaces; fields count from after its ')'.
    let rest = &stat[stat.rfind(')').ok_or_else(|| anyhow!("odd stat"))? + 2..];
    let fields: Vec<&str> = rest.split(' ').collect();
    let utime: u64 = fields
        .get(11)
        .ok_or_else(|| anyhow!("short stat"))?
        .parse()?;
    let stime: u64 = fields
        .get(12)
        .ok_or_else(|| anyhow!("short stat"))?
        .parse()?;
    // SAFETY: sysconf has no preconditions.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    Ok((utime + stime) as f64 / ticks)
}

fn rss(pid: u32) -> anyhow::Result<u64> {
    let status = fs::read_to_string(format!("/proc/{pid}/status"))?;
    let line = status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .ok_or_else(|| anyhow!("no VmRSS"))?;
    Ok(line
        .split_whitespace()
        .nth(1)
        .ok_or_else(|| anyhow!("odd VmRSS"))?
        .parse()?)
}

/// Per process and in total: CPU seconds spent between the samples and
/// resident memory at the end.
pub fn report(watched: &[Watched], start: &Sample, end: &Sample) -> Value {
    let mut per = Map::new();
    let (mut cpu_total, mut rss_total) = (0.0, 0);
    for (i, w) in watched.iter().enumerate() {
        let cpu = end.cpu_seconds[i] - start.cpu_seconds[i];
        cpu_total += cpu;
        rss_total += end.rss_kib[i];
        per.insert(
            w.name.clone(),
            json!({"pid": w.pid, "cpu_s": round(cpu, 3), "rss_kib": end.rss_kib[i],
                   "rss_growth_kib": end.rss_kib[i] as i64 - start.rss_kib[i] as i64}),
        );
    }
    json!({"processes": per, "cpu_s": round(cpu_total, 3), "rss_kib": rss_total})
}

pub fn total_cpu(start: &Sample, end: &Sample) -> f64 {
    end.cpu_seconds.iter().sum::<f64>() - start.cpu_seconds.iter().sum::<f64>()
}

pub fn total_rss_growth_kib(start: &Sample, end: &Sample) -> i64 {
    end.rss_kib.iter().sum::<u64>() as i64 - start.rss_kib.iter().sum::<u64>() as i64
}

pub fn round(x: f64, places: i32) -> f64 {
    let scale = 10f64.powi(places);
    (x * scale).round() / scale
}

/// Raises this process's open-file limit to its hard limit: thousands of
/// client sockets need more than the usual soft 1024.
pub fn raise_nofile_limit() -> u64 {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit only read and write `limit`.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) != 0 {
            return 0;
        }
        if limit.rlim_cur < limit.rlim_max {
            limit.rlim_cur = limit.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &limit);
            libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit);
        }
    }
    limit.rlim_cur
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_this_process() {
        let me = Watched {
            name: "bench".into(),
            pid: std::process::id(),
        };
        let s = sample(&[me]).unwrap();
        assert!(s.rss_kib[0] > 0);
        assert!(s.cpu_seconds[0] >= 0.0);
    }

    #[test]
    fn parses_name_equals_pid() {
        let w: Watched = "broker=42".parse().unwrap();
        assert_eq!((w.name.as_str(), w.pid), ("broker", 42));
        assert!("42".parse::<Watched>().is_err());
    }
}
