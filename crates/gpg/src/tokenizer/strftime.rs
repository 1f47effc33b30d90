//! `strftime_now(format)` for chat templates (Llama 3.x writes "Today Date: 26 Jul 2024").
//!
//! transformers calls Python's `datetime.now().strftime(format)`. Here the clock is read in
//! UTC and formatted by [`strftime`], which implements the C/POSIX directives in the "C"
//! locale. Civil dates come from days since 1970-01-01 with Howard Hinnant's
//! `civil_from_days` (proleptic Gregorian calendar).

use std::time::{SystemTime, UNIX_EPOCH};

/// A UTC instant broken down into calendar fields.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct DateTime {
    pub year: i64,
    /// 1..=12
    pub month: u32,
    /// 1..=31
    pub day: u32,
    pub hour: u32,
    pub minute: u32,
    pub second: u32,
    /// 0 = Monday … 6 = Sunday
    pub weekday: u32,
    /// 1..=366
    pub day_of_year: u32,
}

impl DateTime {
    /// The calendar fields of `seconds` since 1970-01-01T00:00:00Z (negative: before it).
    pub(crate) fn from_unix_seconds(seconds: i64) -> DateTime {
        let days = seconds.div_euclid(86_400);
        let second_of_day = seconds.rem_euclid(86_400) as u32;
        let (year, month, day) = civil_from_days(days);
        let jan1 = days_from_civil(year, 1, 1);
        DateTime {
            year,
            month,
            day,
            hour: second_of_day / 3600,
            minute: second_of_day / 60 % 60,
            second: second_of_day % 60,
            // 1970-01-01 was a Thursday (3 when Monday is 0).
            weekday: (days + 3).rem_euclid(7) as u32,
            day_of_year: (days - jan1 + 1) as u32,
        }
    }

    /// Now, in UTC.
    pub(crate) fn now_utc() -> DateTime {
        let seconds = match SystemTime::now().duration_since(UNIX_EPOCH) {
            Ok(d) => d.as_secs() as i64,
            Err(e) => -(e.duration().as_secs() as i64),
        };
        DateTime::from_unix_seconds(seconds)
    }
}

/// (year, month 1..=12, day 1..=31) of the day `days` after 1970-01-01.
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097); // [0, 146096]
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365; // [0, 399]
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100); // [0, 365], from March 1st
    let mp = (5 * doy + 2) / 153; // [0, 11], March = 0
    let day = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

/// Days from 1970-01-01 to the given civil date (inverse of [`civil_from_days`]).
fn days_from_civil(year: i64, month: u32, day: u32) -> i64 {
    let y = if month <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let yoe = y.rem_euclid(400);
    let m = i64::from(month);
    let mp = if m > 2 { m - 3 } else { m + 9 };
    let doy = (153 * mp + 2) / 5 + i64::from(day) - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

const WEEKDAYS: [&str; 7] = [
    "Monday",
    "Tuesday",
    "Wednesday",
    "Thursday",
    "Friday",
    "Saturday",
    "Sunday",
];
const MONTHS: [&str; 12] = [
    "January",
    "February",
    "March",
    "April",
    "May",
    "June",
    "July",
    "August",
    "September",
    "October",
    "November",
    "December",
];

/// Formats `t` like C `strftime` in the "C" locale. Supported directives: `%a %A %b %h %B
/// %d %e %H %I %j %m %M %p %S %y %Y %F %T %D %R %z %Z %n %t %%`; any other is an error
/// naming it.
pub(crate) fn strftime(format: &str, t: &DateTime) -> Result<String, String> {
    let mut out = String::with_capacity(format.len() + 16);
    let mut chars = format.chars();
    while let Some(c) = chars.next() {
        if c != '%' {
            out.push(c);
            continue;
        }
        let Some(directive) = chars.next() else {
            return Err(format!("strftime format {format:?} ends with a lone '%'"));
        };
        let weekday = WEEKDAYS[t.weekday as usize % 7];
        let month = MONTHS[(t.month as usize + 11) % 12];
        let hour12 = match t.hour % 12 {
            0 => 12,
            h => h,
        };
        match directive {
            'a' => out.push_str(&weekday[..3]),
            'A' => out.push_str(weekday),
            'b' | 'h' => out.push_str(&month[..3]),
            'B' => out.push_str(month),
            'd' => out.push_str(&format!("{:02}", t.day)),
            'e' => out.push_str(&format!("{:2}", t.day)),
            'H' => out.push_str(&format!("{:02}", t.hour)),
            'I' => out.push_str(&format!("{hour12:02}")),
            'j' => out.push_str(&format!("{:03}", t.day_of_year)),
            'm' => out.push_str(&format!("{:02}", t.month)),
            'M' => out.push_str(&format!("{:02}", t.minute)),
            'p' => out.push_str(if t.hour < 12 { "AM" } else { "PM" }),
            'S' => out.push_str(&format!("{:02}", t.second)),
            'y' => out.push_str(&format!("{:02}", t.year.rem_euclid(100))),
            'Y' => out.push_str(&t.year.to_string()),
            'F' => out.push_str(&format!("{}-{:02}-{:02}", t.year, t.month, t.day)),
            'T' => out.push_str(&format!("{:02}:{:02}:{:02}", t.hour, t.minute, t.second)),
            'R' => out.push_str(&format!("{:02}:{:02}", t.hour, t.minute)),
            'D' => out.push_str(&format!(
                "{:02}/{:02}/{:02}",
                t.month,
                t.day,
                t.year.rem_euclid(100)
            )),
            'z' => out.push_str("+0000"),
            'Z' => out.push_str("UTC"),
            'n' => out.push('\n'),
            't' => out.push('\t'),
            '%' => out.push('%'),
            other => {
                return Err(format!(
                    "strftime directive %{other} in {format:?} is not supported"
                ))
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn civil_dates_by_hand() {
        // 0 s: Thursday 1970-01-01.
        let t = DateTime::from_unix_seconds(0);
        assert_eq!(
            (t.year, t.month, t.day, t.weekday, t.day_of_year),
            (1970, 1, 1, 3, 1)
        );
        // 951_782_400 s = 11_016 days: 2000-02-29 (leap day of a century leap year), a Tuesday.
        let t = DateTime::from_unix_seconds(11_016 * 86_400 + 13 * 3600 + 5 * 60 + 9);
        assert_eq!((t.year, t.month, t.day, t.weekday), (2000, 2, 29, 1));
        assert_eq!((t.hour, t.minute, t.second, t.day_of_year), (13, 5, 9, 60));
        // One second before the epoch: 1969-12-31T23:59:59, a Wednesday, day 365.
        let t = DateTime::from_unix_seconds(-1);
        assert_eq!(
            (t.year, t.month, t.day, t.hour, t.weekday),
            (1969, 12, 31, 23, 2)
        );
        assert_eq!(t.day_of_year, 365);
        // 2024-07-26 = 19_930 days after the epoch (Llama 3.1's example date), a Friday.
        assert_eq!(days_from_civil(2024, 7, 26), 19_930);
        let t = DateTime::from_unix_seconds(19_930 * 86_400);
        assert_eq!((t.year, t.month, t.day, t.weekday), (2024, 7, 26, 4));
    }

    #[test]
    fn days_round_trip() {
        for days in (-800_000..800_000).step_by(997) {
            let (y, m, d) = civil_from_days(days);
            assert_eq!(days_from_civil(y, m, d), days);
        }
    }

    #[test]
    fn formats_like_c_locale() {
        let t = DateTime::from_unix_seconds(19_930 * 86_400 + 15 * 3600 + 4 * 60 + 5);
        assert_eq!(strftime("%d %b %Y", &t).unwrap(), "26 Jul 2024");
        assert_eq!(
            strftime("%A, %B %e %y %I:%M:%S %p %j %%", &t).unwrap(),
            "Friday, July 26 24 03:04:05 PM 208 %"
        );
        assert_eq!(
            strftime("%F %T %z", &t).unwrap(),
            "2024-07-26 15:04:05 +0000"
        );
        assert!(strftime("%Q", &t).unwrap_err().contains("%Q"));
        assert!(strftime("50%", &t).is_err());
    }
}
