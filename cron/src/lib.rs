//! CronJob schedules, read exactly as Kubernetes reads them: kube-controller-manager and
//! kube-apiserver parse `spec.schedule` with robfig/cron's *standard* parser, so this crate
//! follows its rules rather than any other cron's:
//!
//! - five fields — minute, hour, day of month, month, day of week — each `*` or `?`, a
//!   value, a range `a-b`, a step `*/n`, `a/n` (from `a` to the field's end) or `a-b/n`, or
//!   a comma-separated list of those; months and weekdays also by their three-letter English
//!   names (`JAN`, `sun`);
//! - the descriptors `@yearly` (`@annually`), `@monthly`, `@weekly`, `@daily` (`@midnight`),
//!   `@hourly`, and `@every <duration>` (Go's duration syntax: `1h30m`, `90s`);
//! - when both day fields are restricted, a day matches if *either* does (Vixie cron's rule);
//!   when either begins with `*` or `?`, both must;
//! - `TZ=` / `CRON_TZ=` prefixes are refused: Kubernetes wants `spec.timeZone` instead.
//!
//! Times are computed in a time zone (jiff's, from the system's tz database), so a schedule
//! of `0 9 * * *` in `Europe/Berlin` fires at nine local time across DST changes. A local
//! time that a DST jump skips fires at the first instant after the gap.
//!
//! Kept as its own crate because both sides need it: the API server validates schedules at
//! admission, the CronJob controller computes the next run.

use jiff::civil::DateTime;
use jiff::tz::TimeZone;
use jiff::{SignedDuration, Timestamp, ToSpan};

/// Why a schedule does not parse (the message is what the API server's `Invalid` says).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ScheduleError {
    /// Not five fields (and not a descriptor).
    #[error("expected exactly 5 fields, found {0}: {1:?}")]
    FieldCount(usize, String),
    /// A field's text is not a value, range, step or list.
    #[error("failed to parse {field} field {text:?}: {why}")]
    Field {
        /// Which field.
        field: &'static str,
        /// Its text.
        text: String,
        /// What is wrong.
        why: String,
    },
    /// `@something` that is not a known descriptor.
    #[error("unrecognized descriptor: {0}")]
    Descriptor(String),
    /// `@every` with a duration that does not parse or is not positive.
    #[error("failed to parse duration {0}")]
    Every(String),
    /// A `TZ=`/`CRON_TZ=` prefix.
    #[error("cannot use TZ or CRON_TZ in schedule, use timeZone field instead")]
    TimeZonePrefix,
}

/// The bits of one field, bit `n` set when value `n` matches.
type Bits = u64;

/// A parsed schedule.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Schedule {
    /// The five-field form.
    Fields {
        /// Minutes 0–59.
        minute: Bits,
        /// Hours 0–23.
        hour: Bits,
        /// Days of the month 1–31.
        dom: Bits,
        /// Months 1–12.
        month: Bits,
        /// Days of the week 0–6 (Sunday is 0).
        dow: Bits,
        /// Whether either day field began with `*` or `?` (then both must match).
        day_star: bool,
    },
    /// `@every d`: every `d` after the previous time, to the second.
    Every(SignedDuration),
}

struct Range {
    name: &'static str,
    min: u32,
    max: u32,
    names: &'static [&'static str],
}

const MINUTE: Range = Range {
    name: "minute",
    min: 0,
    max: 59,
    names: &[],
};
const HOUR: Range = Range {
    name: "hour",
    min: 0,
    max: 23,
    names: &[],
};
const DOM: Range = Range {
    name: "day of month",
    min: 1,
    max: 31,
    names: &[],
};
const MONTH: Range = Range {
    name: "month",
    min: 1,
    max: 12,
    names: &[
        "jan", "feb", "mar", "apr", "may", "jun", "jul", "aug", "sep", "oct", "nov", "dec",
    ],
};
const DOW: Range = Range {
    name: "day of week",
    min: 0,
    max: 6,
    names: &["sun", "mon", "tue", "wed", "thu", "fri", "sat"],
};

impl Range {
    fn error(&self, text: &str, why: impl Into<String>) -> ScheduleError {
        ScheduleError::Field {
            field: self.name,
            text: text.to_owned(),
            why: why.into(),
        }
    }

    fn value(&self, text: &str, whole: &str) -> Result<u32, ScheduleError> {
        let lower = text.to_ascii_lowercase();
        if let Some(i) = self.names.iter().position(|n| *n == lower) {
            return Ok(self.min + i as u32);
        }
        text.parse::<u32>()
            .map_err(|_| self.error(whole, format!("{text:?} is not a number")))
    }

    /// One comma-separated part: `*`, `a`, `a-b`, with an optional `/step`.
    fn part(&self, text: &str) -> Result<Bits, ScheduleError> {
        let (range, step) = match text.split_once('/') {
            Some((r, s)) => {
                let step: u32 = s
                    .parse()
                    .map_err(|_| self.error(text, format!("step {s:?} is not a number")))?;
                if step == 0 {
                    return Err(self.error(text, "step of range should be a positive number"));
                }
                (r, Some(step))
            }
            None => (text, None),
        };
        let (start, end) = if range == "*" || range == "?" {
            (self.min, self.max)
        } else if let Some((a, b)) = range.split_once('-') {
            (self.value(a, text)?, self.value(b, text)?)
        } else {
            let a = self.value(range, text)?;
            // `a/n` runs from a to the end of the field.
            (a, if step.is_some() { self.max } else { a })
        };
        if start < self.min || end > self.max {
            return Err(self.error(
                text,
                format!("beyond the range {}-{} ({start}-{end})", self.min, self.max),
            ));
        }
        if start > end {
            return Err(self.error(
                text,
                format!("beginning of range ({start}) beyond end of range ({end})"),
            ));
        }
        let step = step.unwrap_or(1);
        Ok((start..=end)
            .step_by(step as usize)
            .fold(0, |b, v| b | (1 << v)))
    }

    fn field(&self, text: &str) -> Result<Bits, ScheduleError> {
        text.split(',')
            .map(|p| self.part(p))
            .try_fold(0, |acc, b| b.map(|b| acc | b))
    }
}

/// Go's `time.ParseDuration` for the units a schedule can use (`h`, `m`, `s`, `ms`, …).
fn go_duration(text: &str) -> Option<SignedDuration> {
    let mut rest = text.trim();
    if rest.is_empty() {
        return None;
    }
    let mut total = 0f64;
    while !rest.is_empty() {
        let number_end = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(rest.len());
        let number: f64 = rest[..number_end].parse().ok()?;
        rest = &rest[number_end..];
        let unit_end = rest
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(rest.len());
        let scale = match &rest[..unit_end] {
            "h" => 3600.0,
            "m" => 60.0,
            "s" => 1.0,
            "ms" => 1e-3,
            "us" | "µs" => 1e-6,
            "ns" => 1e-9,
            _ => return None,
        };
        rest = &rest[unit_end..];
        total += number * scale;
    }
    SignedDuration::try_from_secs_f64(total).ok()
}

impl Schedule {
    /// Parses a schedule as kube-apiserver's validation and the CronJob controller do.
    pub fn parse(text: &str) -> Result<Schedule, ScheduleError> {
        let text = text.trim();
        if text.starts_with("TZ=") || text.starts_with("CRON_TZ=") {
            return Err(ScheduleError::TimeZonePrefix);
        }
        if let Some(descriptor) = text.strip_prefix('@') {
            if let Some(every) = descriptor.strip_prefix("every ") {
                let d = go_duration(every)
                    .filter(|d| d.is_positive())
                    .ok_or_else(|| ScheduleError::Every(every.trim().to_owned()))?;
                // robfig rounds below a second up to one second.
                return Ok(Schedule::Every(d.max(SignedDuration::from_secs(1))));
            }
            let fields = match descriptor {
                "yearly" | "annually" => "0 0 1 1 *",
                "monthly" => "0 0 1 * *",
                "weekly" => "0 0 * * 0",
                "daily" | "midnight" => "0 0 * * *",
                "hourly" => "0 * * * *",
                _ => return Err(ScheduleError::Descriptor(text.to_owned())),
            };
            return Schedule::parse(fields);
        }
        let fields: Vec<&str> = text.split_whitespace().collect();
        let [minute, hour, dom, month, dow] = fields[..] else {
            return Err(ScheduleError::FieldCount(fields.len(), text.to_owned()));
        };
        let star = |f: &str| f.starts_with('*') || f.starts_with('?');
        Ok(Schedule::Fields {
            minute: MINUTE.field(minute)?,
            hour: HOUR.field(hour)?,
            dom: DOM.field(dom)?,
            month: MONTH.field(month)?,
            dow: DOW.field(dow)?,
            day_star: star(dom) || star(dow),
        })
    }

    /// The first time strictly after `after` that the schedule names, in `tz`; `None` when
    /// there is none within five years (a schedule like `0 0 30 2 *`).
    pub fn next_after(&self, after: Timestamp, tz: &TimeZone) -> Option<Timestamp> {
        let (minute, hour, dom, month, dow, day_star) = match *self {
            Schedule::Every(d) => {
                // robfig: the previous time plus the period, truncated to the second.
                let next = after.checked_add(d).ok()?;
                return Timestamp::from_second(next.as_second()).ok();
            }
            Schedule::Fields {
                minute,
                hour,
                dom,
                month,
                dow,
                day_star,
            } => (minute, hour, dom, month, dow, day_star),
        };
        let has = |bits: Bits, v: i8| bits & (1 << v) != 0;
        let start = after.to_zoned(tz.clone()).datetime();
        let limit = start.year() + 5;
        // The next whole minute after `after`.
        let mut t: DateTime = start
            .with()
            .second(0)
            .subsec_nanosecond(0)
            .build()
            .ok()?
            .checked_add(1.minute())
            .ok()?;
        while t.year() <= limit {
            if !has(month, t.month()) {
                t = t
                    .first_of_month()
                    .checked_add(1.month())
                    .ok()?
                    .start_of_day();
                continue;
            }
            let dom_ok = has(dom, t.day());
            let dow_ok = has(dow, t.weekday().to_sunday_zero_offset());
            let day_ok = if day_star {
                dom_ok && dow_ok
            } else {
                dom_ok || dow_ok
            };
            if !day_ok {
                t = t.start_of_day().checked_add(1.day()).ok()?;
                continue;
            }
            if !has(hour, t.hour()) {
                t = t
                    .with()
                    .minute(0)
                    .build()
                    .ok()?
                    .checked_add(1.hour())
                    .ok()?;
                continue;
            }
            if !has(minute, t.minute()) {
                t = t.checked_add(1.minute()).ok()?;
                continue;
            }
            // A local time inside a DST gap resolves to just after it; an ambiguous one to
            // its first occurrence.
            let at = tz.to_ambiguous_zoned(t).compatible().ok()?;
            if at.timestamp() > after {
                return Some(at.timestamp());
            }
            t = t.checked_add(1.minute()).ok()?;
        }
        None
    }

    /// The latest scheduled time in `(after, until]`, with how many there were (capped at
    /// `cap`, beyond which the count is only "more than"): the CronJob controller's "most
    /// recent unmet schedule time".
    pub fn latest_between(
        &self,
        after: Timestamp,
        until: Timestamp,
        tz: &TimeZone,
        cap: usize,
    ) -> (Option<Timestamp>, usize) {
        let (mut latest, mut count) = (None, 0);
        let mut t = after;
        while let Some(next) = self.next_after(t, tz) {
            if next > until {
                break;
            }
            latest = Some(next);
            count += 1;
            if count > cap {
                // Too many to walk: jump near the end and find the last one from there.
                let window = match self {
                    Schedule::Every(d) => *d,
                    Schedule::Fields { .. } => SignedDuration::from_hours(24 * 366),
                };
                let near = until.checked_sub(window).unwrap_or(next).max(next);
                let mut u = near;
                while let Some(n) = self.next_after(u, tz) {
                    if n > until {
                        break;
                    }
                    latest = Some(n);
                    u = n;
                }
                break;
            }
            t = next;
        }
        (latest, count)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(s: &str) -> Timestamp {
        s.parse().unwrap()
    }

    fn next(schedule: &str, after: &str) -> String {
        Schedule::parse(schedule)
            .unwrap()
            .next_after(at(after), &TimeZone::UTC)
            .map(|t| t.to_string())
            .unwrap_or_default()
    }

    #[test]
    fn fields_ranges_steps_and_names() {
        assert_eq!(
            next("*/1 * * * ?", "2026-12-03T10:00:30Z"),
            "2026-12-03T10:01:00Z"
        );
        assert_eq!(
            next("*/5 * * * *", "2026-12-03T10:01:00Z"),
            "2026-12-03T10:05:00Z"
        );
        assert_eq!(
            next("15 2 * * *", "2026-12-03T10:00:00Z"),
            "2026-12-04T02:15:00Z"
        );
        assert_eq!(
            next("0 0 1 jan *", "2026-12-03T10:00:00Z"),
            "2027-01-01T00:00:00Z"
        );
        assert_eq!(
            next("0 9 * * MON-FRI", "2026-12-04T10:00:00Z"),
            "2026-12-07T09:00:00Z"
        );
        assert_eq!(
            next("30 1-5/2 * * *", "2026-12-03T01:30:00Z"),
            "2026-12-03T03:30:00Z"
        );
        assert_eq!(
            next("0 0 5/10 * *", "2026-12-03T00:00:00Z"),
            "2026-12-05T00:00:00Z"
        );
        assert_eq!(
            next("@hourly", "2026-12-03T10:00:00Z"),
            "2026-12-03T11:00:00Z"
        );
        assert_eq!(
            next("@every 90s", "2026-12-03T10:00:00Z"),
            "2026-12-03T10:01:30Z"
        );
        assert_eq!(next("0 0 30 2 *", "2026-12-03T10:00:00Z"), "");
    }

    #[test]
    fn restricted_day_fields_match_either() {
        // The 13th, or any Friday (Dec 4th 2026 is a Friday).
        assert_eq!(
            next("0 0 13 * 5", "2026-12-03T10:00:00Z"),
            "2026-12-04T00:00:00Z"
        );
        // A star day of week: only the 13th.
        assert_eq!(
            next("0 0 13 * *", "2026-12-03T10:00:00Z"),
            "2026-12-13T00:00:00Z"
        );
        // `*/2` in the day of week counts as a star: both must match (Tuesdays on odd days…).
        assert_eq!(
            next("0 0 1 * */1", "2026-12-03T10:00:00Z"),
            "2027-01-01T00:00:00Z"
        );
    }

    #[test]
    fn time_zones_follow_dst() {
        let tz = TimeZone::get("Europe/Berlin").unwrap();
        let s = Schedule::parse("0 9 * * *").unwrap();
        // Winter: 09:00 CET is 08:00 UTC; summer: 07:00 UTC.
        assert_eq!(
            s.next_after(at("2026-12-03T10:00:00Z"), &tz).unwrap(),
            at("2026-12-04T08:00:00Z")
        );
        assert_eq!(
            s.next_after(at("2026-07-03T10:00:00Z"), &tz).unwrap(),
            at("2026-07-04T07:00:00Z")
        );
        // 02:30 does not exist on 2026-03-29 in Berlin: the first instant after the gap.
        let gap = Schedule::parse("30 2 * * *").unwrap();
        assert_eq!(
            gap.next_after(at("2026-03-28T12:00:00Z"), &tz).unwrap(),
            at("2026-03-29T01:30:00Z")
        );
    }

    #[test]
    fn bad_schedules_say_why() {
        for bad in [
            "* * * *",
            "60 * * * *",
            "* 24 * * *",
            "* * 0 * *",
            "* * * 13 *",
            "* * * * 7",
            "*/0 * * * *",
            "5-1 * * * *",
            "a * * * *",
            "@fortnightly",
            "@every soon",
            "TZ=UTC * * * * *",
            "CRON_TZ=UTC 0 * * * *",
        ] {
            assert!(Schedule::parse(bad).is_err(), "{bad} parsed");
        }
        assert_eq!(
            Schedule::parse("CRON_TZ=UTC 0 * * * *")
                .unwrap_err()
                .to_string(),
            "cannot use TZ or CRON_TZ in schedule, use timeZone field instead"
        );
    }

    #[test]
    fn latest_between_counts_missed_runs() {
        let s = Schedule::parse("*/1 * * * *").unwrap();
        let (latest, count) = s.latest_between(
            at("2026-12-03T10:00:00Z"),
            at("2026-12-03T10:05:30Z"),
            &TimeZone::UTC,
            100,
        );
        assert_eq!(latest, Some(at("2026-12-03T10:05:00Z")));
        assert_eq!(count, 5);
        let (latest, count) = s.latest_between(
            at("2026-12-01T00:00:00Z"),
            at("2026-12-03T10:05:30Z"),
            &TimeZone::UTC,
            100,
        );
        assert_eq!(latest, Some(at("2026-12-03T10:05:00Z")));
        assert!(count > 100);
    }
}
