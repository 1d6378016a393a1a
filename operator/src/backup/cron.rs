//! 5-field cron expressions (minute hour day-of-month month day-of-week), in UTC, as
//! `crontab(5)` reads them: `*`, numbers, ranges `a-b`, steps `*/n` and `a-b/n`, lists
//! `a,b`, month and weekday names (`JAN`, `MON`), day-of-week 0 or 7 for Sunday. When
//! both day fields are restricted, a day matches either (the classic cron rule).

use k8s_openapi::jiff::civil::{Date, DateTime, Time};
use k8s_openapi::jiff::tz::TimeZone;
use k8s_openapi::jiff::{Timestamp, ToSpan};

/// Why an expression is not a cron schedule.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CronError {
    /// Not five fields.
    #[error("expected 5 fields (minute hour day-of-month month day-of-week), got {0}")]
    FieldCount(usize),
    /// A field does not parse or is out of range.
    #[error("{field} field {value:?}: {reason}")]
    Field {
        /// Which field.
        field: &'static str,
        /// Its text.
        value: String,
        /// What is wrong.
        reason: String,
    },
}

/// A parsed schedule: for each field, the set of values it matches.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Cron {
    minutes: u64,
    hours: u64,
    days: u64,
    months: u64,
    weekdays: u64,
    days_restricted: bool,
    weekdays_restricted: bool,
}

struct Spec {
    name: &'static str,
    min: u32,
    max: u32,
    names: &'static [&'static str],
}

const MINUTE: Spec = Spec {
    name: "minute",
    min: 0,
    max: 59,
    names: &[],
};
const HOUR: Spec = Spec {
    name: "hour",
    min: 0,
    max: 23,
    names: &[],
};
const DAY: Spec = Spec {
    name: "day-of-month",
    min: 1,
    max: 31,
    names: &[],
};
const MONTH: Spec = Spec {
    name: "month",
    min: 1,
    max: 12,
    names: &[
        "JAN", "FEB", "MAR", "APR", "MAY", "JUN", "JUL", "AUG", "SEP", "OCT", "NOV", "DEC",
    ],
};
// 7 is Sunday too; folded into 0 after parsing.
const WEEKDAY: Spec = Spec {
    name: "day-of-week",
    min: 0,
    max: 7,
    names: &["SUN", "MON", "TUE", "WED", "THU", "FRI", "SAT"],
};

fn parse_value(spec: &Spec, text: &str) -> Result<u32, String> {
    let upper = text.to_ascii_uppercase();
    if let Some(index) = spec.names.iter().position(|n| *n == upper) {
        // Names count from the field's minimum (JAN = 1, SUN = 0).
        return Ok(spec.min + index as u32);
    }
    let value: u32 = text
        .parse()
        .map_err(|_| format!("{text:?} is not a number"))?;
    if value < spec.min || value > spec.max {
        return Err(format!("{value} is outside {}-{}", spec.min, spec.max));
    }
    Ok(value)
}

fn parse_field(spec: &Spec, text: &str) -> Result<u64, CronError> {
    let fail = |reason: String| CronError::Field {
        field: spec.name,
        value: text.to_string(),
        reason,
    };
    let mut set = 0u64;
    for part in text.split(',') {
        let (range, step) = match part.split_once('/') {
            Some((range, step)) => {
                let step: u32 = step
                    .parse()
                    .map_err(|_| fail(format!("step {step:?} is not a number")))?;
                if step == 0 {
                    return Err(fail("a step of 0".into()));
                }
                (range, step)
            }
            None => (part, 1),
        };
        let (low, high) = if range == "*" {
            (spec.min, spec.max)
        } else if let Some((a, b)) = range.split_once('-') {
            let (a, b) = (
                parse_value(spec, a).map_err(fail)?,
                parse_value(spec, b).map_err(fail)?,
            );
            if a > b {
                return Err(fail(format!("range {a}-{b} runs backwards")));
            }
            (a, b)
        } else {
            let a = parse_value(spec, range).map_err(fail)?;
            // `a/n` means from a to the end, every n.
            (a, if part.contains('/') { spec.max } else { a })
        };
        let mut value = low;
        while value <= high {
            set |= 1 << value;
            value += step;
        }
    }
    Ok(set)
}

impl std::str::FromStr for Cron {
    type Err = CronError;

    fn from_str(text: &str) -> Result<Self, CronError> {
        let fields: Vec<&str> = text.split_whitespace().collect();
        if fields.len() != 5 {
            return Err(CronError::FieldCount(fields.len()));
        }
        let mut weekdays = parse_field(&WEEKDAY, fields[4])?;
        if weekdays & (1 << 7) != 0 {
            weekdays = (weekdays & !(1 << 7)) | 1;
        }
        Ok(Self {
            minutes: parse_field(&MINUTE, fields[0])?,
            hours: parse_field(&HOUR, fields[1])?,
            days: parse_field(&DAY, fields[2])?,
            months: parse_field(&MONTH, fields[3])?,
            weekdays,
            days_restricted: !fields[2].starts_with('*'),
            weekdays_restricted: !fields[4].starts_with('*'),
        })
    }
}

fn has(set: u64, value: i8) -> bool {
    value >= 0 && set & (1 << value) != 0
}

impl Cron {
    fn day_matches(&self, date: Date) -> bool {
        let day = has(self.days, date.day());
        let weekday = has(self.weekdays, date.weekday().to_sunday_zero_offset());
        match (self.days_restricted, self.weekdays_restricted) {
            (true, true) => day || weekday,
            (true, false) => day,
            (false, true) => weekday,
            (false, false) => true,
        }
    }

    /// The first time strictly after `after` (to the minute) that the schedule fires, or
    /// `None` when it never does within eight years (e.g. `0 0 30 2 *`).
    pub fn next_after(&self, after: Timestamp) -> Option<Timestamp> {
        let start = after.to_zoned(TimeZone::UTC).datetime();
        // The next whole minute.
        let mut t = DateTime::from_parts(
            start.date(),
            Time::new(start.hour(), start.minute(), 0, 0).ok()?,
        )
        .checked_add(1.minute())
        .ok()?;
        let limit = start.checked_add(8.years()).ok()?;
        while t <= limit {
            if !has(self.months, t.month()) {
                let first = Date::new(t.year(), t.month(), 1)
                    .ok()?
                    .checked_add(1.month())
                    .ok()?;
                t = first.to_datetime(Time::midnight());
                continue;
            }
            if !self.day_matches(t.date()) {
                t = t
                    .date()
                    .checked_add(1.day())
                    .ok()?
                    .to_datetime(Time::midnight());
                continue;
            }
            if !has(self.hours, t.hour()) {
                t = DateTime::from_parts(t.date(), Time::new(t.hour(), 0, 0, 0).ok()?)
                    .checked_add(1.hour())
                    .ok()?;
                continue;
            }
            if !has(self.minutes, t.minute()) {
                t = t.checked_add(1.minute()).ok()?;
                continue;
            }
            return t.to_zoned(TimeZone::UTC).ok().map(|z| z.timestamp());
        }
        None
    }

    /// The last time at or before `now` that the schedule fired after `since`, if any.
    /// Walks forward from `since`, so a long outage with a frequent schedule costs one
    /// step per missed run (a minute schedule down for a year: half a million steps).
    pub fn last_fire_between(&self, since: Timestamp, now: Timestamp) -> Option<Timestamp> {
        let mut last = None;
        let mut t = since;
        while let Some(next) = self.next_after(t) {
            if next > now {
                break;
            }
            last = Some(next);
            t = next;
        }
        last
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(text: &str) -> Timestamp {
        text.parse().unwrap()
    }

    fn next(cron: &str, after: &str) -> String {
        cron.parse::<Cron>()
            .unwrap()
            .next_after(at(after))
            .map(|t| t.to_string())
            .unwrap_or_else(|| "never".into())
    }

    #[test]
    fn next_times() {
        for (cron, after, expected) in [
            ("* * * * *", "2026-12-06T10:15:30Z", "2026-12-06T10:16:00Z"),
            (
                "0 */6 * * *",
                "2026-12-06T10:15:00Z",
                "2026-12-06T12:00:00Z",
            ),
            (
                "0 */6 * * *",
                "2026-12-06T12:00:00Z",
                "2026-12-06T18:00:00Z",
            ),
            ("30 2 * * *", "2026-12-06T02:30:00Z", "2026-12-07T02:30:00Z"),
            ("0 3 * * 0", "2026-12-06T10:00:00Z", "2026-12-13T03:00:00Z"),
            (
                "0 3 * * SUN",
                "2026-12-06T10:00:00Z",
                "2026-12-13T03:00:00Z",
            ),
            ("0 3 * * 7", "2026-12-06T10:00:00Z", "2026-12-13T03:00:00Z"),
            (
                "0 0 1 JAN *",
                "2026-12-06T10:00:00Z",
                "2027-01-01T00:00:00Z",
            ),
            ("0 0 29 2 *", "2026-12-06T10:00:00Z", "2028-02-29T00:00:00Z"),
            (
                "15,45 9-17/4 * * MON-FRI",
                "2026-12-05T10:00:00Z",
                "2026-12-07T09:15:00Z",
            ),
            // Both day fields restricted: either matches (the 1st, or a Monday).
            ("0 0 1 * 1", "2026-12-06T10:00:00Z", "2026-12-07T00:00:00Z"),
            (
                "5/20 * * * *",
                "2026-12-06T10:46:00Z",
                "2026-12-06T11:05:00Z",
            ),
            ("0 0 30 2 *", "2026-12-06T10:00:00Z", "never"),
        ] {
            assert_eq!(next(cron, after), expected, "{cron} after {after}");
        }
    }

    #[test]
    fn bad_expressions_name_the_field() {
        for (cron, phrase) in [
            ("* * * *", "expected 5 fields"),
            ("60 * * * *", "minute field"),
            ("* 24 * * *", "hour field"),
            ("* * 0 * *", "day-of-month field"),
            ("* * * 13 *", "month field"),
            ("* * * * 8", "day-of-week field"),
            ("*/0 * * * *", "a step of 0"),
            ("5-1 * * * *", "runs backwards"),
            ("x * * * *", "not a number"),
        ] {
            let error = cron.parse::<Cron>().unwrap_err().to_string();
            assert!(error.contains(phrase), "{cron}: {error}");
        }
    }

    #[test]
    fn the_last_missed_run_is_found() {
        let cron: Cron = "0 * * * *".parse().unwrap();
        assert_eq!(
            cron.last_fire_between(at("2026-12-06T01:30:00Z"), at("2026-12-06T05:10:00Z")),
            Some(at("2026-12-06T05:00:00Z"))
        );
        assert_eq!(
            cron.last_fire_between(at("2026-12-06T05:00:00Z"), at("2026-12-06T05:59:00Z")),
            None
        );
    }
}
