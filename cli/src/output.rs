//! Tables for people, JSON for scripts, and errors that read like a person
//! wrote them.

use comfy_table::presets::NOTHING;
use comfy_table::Table;

/// Prints rows under a header as an aligned table.
pub fn table(header: &[&str], rows: Vec<Vec<String>>) {
    let mut table = Table::new();
    table.load_preset(NOTHING);
    table.set_header(header.to_vec());
    for row in rows {
        table.add_row(row);
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

/// A time in nanoseconds as RFC 3339-ish UTC text (seconds precision).
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

/// Bytes for people.
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

/// The message to show for an error: the service's own words, without the
/// chain of causes a backtrace would show.
pub fn describe(err: &anyhow::Error) -> String {
    if let Some(err) = err.downcast_ref::<berth_bus::Error>() {
        return err.message.clone();
    }
    format!("{err:#}")
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
    fn sizes_print_in_decimal_units() {
        assert_eq!(size(999), "999 B");
        assert_eq!(size(1_095_680), "1.1 MB");
    }
}
