//! Tables for people, JSON for scripts, times and sizes as people read
//! them, and errors that read like a person wrote them.

use std::fmt;

use comfy_table::presets::NOTHING;
use comfy_table::Table;

use berth_bus::Code;

/// The exit code of a failure of berth itself (docker's 125).
pub const FAILED: u8 = 125;

/// A failure that ends berth with its own exit code instead of
/// [`FAILED`], such as 127 for a command the container does not have.
#[derive(Debug)]
pub struct Exit {
    /// The process's exit code.
    pub code: u8,
    /// What to print, without the `berth: ` prefix.
    pub message: String,
}

impl fmt::Display for Exit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for Exit {}

/// Prints rows under a header as an aligned table.
pub fn table(header: &[&str], rows: Vec<Vec<String>>) {
    let mut table = Table::new();
    table.load_preset(NOTHING);
    table.set_header(header.to_vec());
    for row in rows {
        table.add_row(row);
    }
    // Columns apart by three spaces, none before the first, as docker prints.
    for column in table.column_iter_mut() {
        column.set_padding((0, 3));
    }
    for line in table.lines() {
        println!("{}", line.trim_end());
    }
}

/// Prints a value as pretty JSON.
pub fn json(value: &serde_json::Value) {
    println!(
        "{}",
        serde_json::to_string_pretty(value).unwrap_or_default()
    );
}

/// The nanoseconds of an optional wire timestamp, 0 when absent.
pub fn nanos(timestamp: Option<&berth_proto::Timestamp>) -> i64 {
    timestamp.map(|t| t.unix_nanos).unwrap_or_default()
}

/// Now, in nanoseconds since the Unix epoch.
pub fn now_nanos() -> i64 {
    berth_proto::Timestamp::now().unix_nanos
}

/// A time in nanoseconds as RFC 3339 UTC text (seconds precision), `-`
/// for none.
pub fn time(nanos: i64) -> String {
    if nanos <= 0 {
        return "-".to_string();
    }
    let secs = nanos / 1_000_000_000;
    let days = secs.div_euclid(86_400);
    let rem = secs.rem_euclid(86_400);
    let (year, month, day) = civil_from_days(days);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        (rem % 3600) / 60,
        rem % 60
    )
}

/// How long ago a time was, as docker says it: `5 seconds ago`.
pub fn ago(nanos: i64) -> String {
    if nanos <= 0 {
        return "-".to_string();
    }
    let secs = ((now_nanos() - nanos) / 1_000_000_000).max(0);
    let (value, unit) = match secs {
        0..=59 => (secs, "second"),
        60..=3599 => (secs / 60, "minute"),
        3600..=86_399 => (secs / 3600, "hour"),
        _ => (secs / 86_400, "day"),
    };
    let plural = if value == 1 { "" } else { "s" };
    format!("{value} {unit}{plural} ago")
}

/// Days since 1970-01-01 to a proleptic Gregorian date.
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

/// A proleptic Gregorian date to days since 1970-01-01.
fn days_from_civil(year: i64, month: u32, day: u32) -> i64 {
    let year = if month <= 2 { year - 1 } else { year };
    let era = year.div_euclid(400);
    let yoe = year.rem_euclid(400);
    let mp = i64::from((month + 9) % 12);
    let doy = (153 * mp + 2) / 5 + i64::from(day) - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// Parses a point in time as the `--since` flags take it, in nanoseconds
/// since the Unix epoch: a duration back from now (`10m`, `1h30m`, `45s`),
/// an RFC 3339 time (`2024-01-01T12:00:00Z`, fractions and offsets
/// allowed), or a date (`2024-01-01`, midnight UTC).
pub fn parse_time(text: &str) -> anyhow::Result<i64> {
    if let Some(duration) = parse_duration(text) {
        return Ok(now_nanos() - duration.as_nanos() as i64);
    }
    parse_rfc3339(text).ok_or_else(|| {
        anyhow::anyhow!(
            "cannot read {text:?} as a time: give a duration back from now (10m, 2h) \
             or an RFC 3339 time (2024-01-01T12:00:00Z)"
        )
    })
}

/// A duration such as `90s`, `10m`, `1h30m` or `2d`.
pub fn parse_duration(text: &str) -> Option<std::time::Duration> {
    let mut total = 0f64;
    let mut number = String::new();
    let mut any = false;
    for c in text.chars() {
        if c.is_ascii_digit() || c == '.' {
            number.push(c);
            continue;
        }
        let value: f64 = number.parse().ok()?;
        number.clear();
        let unit = match c {
            's' => 1.0,
            'm' => 60.0,
            'h' => 3600.0,
            'd' => 86_400.0,
            _ => return None,
        };
        total += value * unit;
        any = true;
    }
    if !number.is_empty() || !any {
        return None;
    }
    Some(std::time::Duration::from_secs_f64(total))
}

fn parse_rfc3339(text: &str) -> Option<i64> {
    let (date, rest) = match text.split_once(['T', 't', ' ']) {
        Some((date, rest)) => (date, Some(rest)),
        None => (text, None),
    };
    let mut parts = date.splitn(3, '-');
    let year: i64 = parts.next()?.parse().ok()?;
    let month: u32 = parts.next()?.parse().ok()?;
    let day: u32 = parts.next()?.parse().ok()?;
    if !(1..=12).contains(&month) || !(1..=31).contains(&day) {
        return None;
    }
    let mut nanos = days_from_civil(year, month, day) * 86_400 * 1_000_000_000;
    let Some(rest) = rest else {
        return Some(nanos);
    };

    // The clock, then an optional fraction, then `Z` or an offset.
    let zone_at = rest
        .find(['Z', 'z', '+'])
        .or_else(|| rest.rfind('-'))
        .unwrap_or(rest.len());
    let (clock, zone) = rest.split_at(zone_at);
    let (clock, fraction) = clock.split_once('.').unwrap_or((clock, ""));
    let mut fields = clock.split(':');
    let hour: i64 = fields.next()?.parse().ok()?;
    let minute: i64 = fields.next()?.parse().ok()?;
    let second: i64 = fields.next().unwrap_or("0").parse().ok()?;
    nanos += ((hour * 60 + minute) * 60 + second) * 1_000_000_000;
    if !fraction.is_empty() {
        let digits: String = fraction
            .chars()
            .chain("000000000".chars())
            .take(9)
            .collect();
        nanos += digits.parse::<i64>().ok()?;
    }
    let offset = match zone {
        "" | "Z" | "z" => 0,
        zone => {
            let sign = if zone.starts_with('-') { -1 } else { 1 };
            let (h, m) = zone[1..].split_once(':').unwrap_or((&zone[1..], "0"));
            sign * (h.parse::<i64>().ok()? * 60 + m.parse::<i64>().ok()?) * 60
        }
    };
    Some(nanos - offset * 1_000_000_000)
}

/// Bytes for people, in decimal units as docker prints image sizes.
pub fn size(bytes: i64) -> String {
    let units = ["B", "KB", "MB", "GB", "TB"];
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1000.0 && unit < units.len() - 1 {
        value /= 1000.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{bytes} B")
    } else {
        format!("{value:.1} {}", units[unit])
    }
}

/// Bytes for people, in binary units as docker prints memory.
pub fn mem(bytes: u64) -> String {
    let units = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit < units.len() - 1 {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{bytes}B")
    } else {
        format!("{value:.2}{}", units[unit])
    }
}

/// The message to show for an error: what berth was doing, then the
/// service's own words, each once, and a hint where one helps.
pub fn describe(err: &anyhow::Error) -> String {
    // A context that already quotes its cause would say it twice.
    let mut parts: Vec<String> = Vec::new();
    for cause in err.chain() {
        let text = cause.to_string();
        if parts.last().is_some_and(|last| last.contains(&text)) {
            continue;
        }
        parts.push(text);
    }
    let mut message = parts.join(": ");
    if let Some(bus) = err.downcast_ref::<berth_bus::Error>() {
        match bus.code {
            Code::Unavailable if bus.message.starts_with("no responder") => {
                message.push_str(" (is berthd running on that node, and up to date?)");
            }
            Code::DeadlineExceeded => message.push_str(" (a longer --timeout may help)"),
            _ => {}
        }
    }
    message
}

/// The exit code for an error: its own for an [`Exit`], else [`FAILED`].
pub fn exit_code(err: &anyhow::Error) -> u8 {
    err.downcast_ref::<Exit>()
        .map(|exit| exit.code)
        .unwrap_or(FAILED)
}

/// True when `err` is a service's `code` failure.
pub fn is_code(err: &anyhow::Error, code: Code) -> bool {
    err.downcast_ref::<berth_bus::Error>()
        .is_some_and(|bus| bus.code == code)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_print_as_utc_dates() {
        assert_eq!(time(0), "-");
        assert_eq!(time(1_704_067_200 * 1_000_000_000), "2024-01-01T00:00:00Z");
    }

    #[test]
    fn times_parse_as_rfc3339_dates_and_durations() {
        let jan1 = 1_704_067_200 * 1_000_000_000;
        assert_eq!(parse_time("2024-01-01T00:00:00Z").unwrap(), jan1);
        assert_eq!(parse_time("2024-01-01").unwrap(), jan1);
        assert_eq!(parse_time("2024-01-01T01:00:00+01:00").unwrap(), jan1);
        assert_eq!(
            parse_time("2024-01-01T00:00:00.5Z").unwrap(),
            jan1 + 500_000_000
        );
        let ten_minutes_ago = parse_time("10m").unwrap();
        assert!((now_nanos() - ten_minutes_ago - 600_000_000_000).abs() < 5_000_000_000);
        assert!(parse_time("yesterday").is_err());
        assert_eq!(
            parse_duration("1h30m"),
            Some(std::time::Duration::from_secs(5400))
        );
        assert_eq!(parse_duration("10"), None);
    }

    #[test]
    fn sizes_print_in_decimal_and_binary_units() {
        assert_eq!(size(999), "999 B");
        assert_eq!(size(1_095_680), "1.1 MB");
        assert_eq!(mem(16 * 1024 * 1024), "16.00MiB");
    }

    #[test]
    fn errors_name_the_step_and_the_cause_once() {
        let bus = berth_bus::Error::not_found("snapshot \"k\" not found");
        let err = anyhow::Error::new(bus).context("cannot start web");
        assert_eq!(describe(&err), "cannot start web: snapshot \"k\" not found");
        assert_eq!(exit_code(&err), FAILED);
        let exit = anyhow::Error::new(Exit {
            code: 127,
            message: "not found".into(),
        });
        assert_eq!(exit_code(&exit), 127);
    }
}
