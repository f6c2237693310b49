//! `meridian audit`: every change asked of the control plane — who (which
//! token), what, on which app, when, and how it ended. A token sees the
//! entries of the apps it may read; the administrator sees all.

use crate::commands::deploy::ControlArgs;
use bytes::Bytes;
use http::Method;
use meridian_control::audit::Entry;
use std::time::Duration;

#[derive(clap::Args)]
pub struct Args {
    #[command(flatten)]
    pub control: ControlArgs,
    /// Only this app's entries.
    #[arg(long)]
    pub app: Option<String>,
    #[arg(long)]
    pub json: bool,
}

pub async fn run(a: Args) -> anyhow::Result<()> {
    let (url, op) = a.control.connect()?;
    let path = match &a.app {
        Some(app) => format!("/v1/audit?app={app}"),
        None => "/v1/audit".to_string(),
    };
    let body = op.control_ok(&url, Method::GET, &path, Bytes::new(), Duration::from_secs(10)).await?;
    let entries: Vec<Entry> = serde_json::from_slice(&body)?;
    if a.json {
        out!("{}", serde_json::to_string_pretty(&entries)?);
        return Ok(());
    }
    for e in entries {
        out!(
            "{:>5} {} {:<14} {:<16} {:<10} {}  -> {}",
            e.seq,
            utc(e.at_ms),
            e.who,
            e.action,
            e.app.as_deref().unwrap_or("-"),
            e.detail,
            e.outcome
        );
    }
    Ok(())
}

/// `2026-11-29T07:34:08.065Z` for milliseconds since the Unix epoch (the
/// civil-from-days algorithm of H. Hinnant's `date`).
fn utc(ms: u64) -> String {
    let (days, rem) = ((ms / 86_400_000) as i64, ms % 86_400_000);
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    let (h, mi, s, milli) = (rem / 3_600_000, rem / 60_000 % 60, rem / 1000 % 60, rem % 1000);
    format!("{y:04}-{m:02}-{d:02}T{h:02}:{mi:02}:{s:02}.{milli:03}Z")
}

#[cfg(test)]
mod tests {
    #[test]
    fn utc_times() {
        assert_eq!(super::utc(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(super::utc(1_795_936_448_065), "2026-11-29T07:14:08.065Z");
        assert_eq!(super::utc(951_782_400_000), "2000-02-29T00:00:00.000Z");
    }
}
