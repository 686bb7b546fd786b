//! Reading containers' CRI-format logs (`<RFC 3339 time> <stream> <P|F> <text>`) the way
//! `kubectl logs` asks for them: `tailLines`, `sinceSeconds`/`sinceTime`, `timestamps`,
//! `limitBytes`, `previous`, and `follow` (new lines as they are written, until the
//! container exits).

use std::fs;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

/// What `kubectl logs` asked for (the query of `pods/log`).
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct LogOptions {
    /// Which container (needed when the pod has more than one).
    pub container: Option<String>,
    /// Keep streaming new lines.
    #[serde(default, deserialize_with = "boolish")]
    pub follow: bool,
    /// The previous attempt's log.
    #[serde(default, deserialize_with = "boolish")]
    pub previous: bool,
    /// Only the last N lines.
    pub tail_lines: Option<i64>,
    /// Only lines newer than this many seconds.
    pub since_seconds: Option<i64>,
    /// Only lines at or after this RFC 3339 time.
    pub since_time: Option<String>,
    /// Prefix each line with its time.
    #[serde(default, deserialize_with = "boolish")]
    pub timestamps: bool,
    /// Stop after this many bytes.
    pub limit_bytes: Option<i64>,
}

fn boolish<'de, D: serde::Deserializer<'de>>(d: D) -> Result<bool, D::Error> {
    let s = String::deserialize(d)?;
    Ok(matches!(s.as_str(), "true" | "1" | "True" | ""))
}

/// One log record: a whole line (partials joined).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Line {
    /// RFC 3339 with nanoseconds, as written.
    pub time: String,
    /// `stdout` or `stderr`.
    pub stream: String,
    /// The text, without the newline.
    pub text: String,
}

impl Line {
    /// The line as `kubectl logs` prints it.
    pub fn render(&self, timestamps: bool) -> String {
        if timestamps {
            format!("{} {}\n", self.time, self.text)
        } else {
            format!("{}\n", self.text)
        }
    }
}

/// Parses CRI records into lines, joining `P`artial records with the `F`ull one that ends
/// them; a trailing partial (a line still being written) is returned separately.
pub fn parse(text: &str) -> (Vec<Line>, Option<Line>) {
    let mut lines = Vec::new();
    let mut partial: Option<Line> = None;
    for record in text.split('\n') {
        let mut parts = record.splitn(4, ' ');
        let (Some(time), Some(stream), Some(tag)) = (parts.next(), parts.next(), parts.next())
        else {
            continue;
        };
        let content = parts.next().unwrap_or("");
        let line = match partial.take() {
            Some(mut p) => {
                p.text.push_str(content);
                p
            }
            None => Line {
                time: time.to_owned(),
                stream: stream.to_owned(),
                text: content.to_owned(),
            },
        };
        if tag == "P" {
            partial = Some(line);
        } else {
            lines.push(line);
        }
    }
    (lines, partial)
}

/// The log files of one container attempt, oldest first (the rotated file, then the
/// current one).
pub fn files(log: &Path) -> Vec<PathBuf> {
    let mut rotated = log.as_os_str().to_owned();
    rotated.push(".1");
    let rotated = PathBuf::from(rotated);
    [rotated, log.to_owned()]
        .into_iter()
        .filter(|p| p.exists())
        .collect()
}

/// The lines of `log` selected by `options` (all but `follow`), and the byte offset the
/// current file was read to (where following continues).
pub fn read(log: &Path, options: &LogOptions) -> (Vec<Line>, u64) {
    let mut text = String::new();
    let mut offset = 0;
    for file in files(log) {
        let content = fs::read(&file).unwrap_or_default();
        if file == log {
            // Stop at the last complete record; the rest is still being written.
            let end = content
                .iter()
                .rposition(|b| *b == b'\n')
                .map_or(0, |i| i + 1);
            offset = end as u64;
            text.push_str(&String::from_utf8_lossy(&content[..end]));
        } else {
            text.push_str(&String::from_utf8_lossy(&content));
        }
    }
    let (mut lines, _) = parse(&text);
    if let Some(since) = since(options) {
        lines.retain(|l| l.time.parse::<jiff::Timestamp>().is_ok_and(|t| t >= since));
    }
    if let Some(tail) = options.tail_lines.filter(|t| *t >= 0) {
        let skip = lines.len().saturating_sub(tail as usize);
        lines.drain(..skip);
    }
    (lines, offset)
}

/// The earliest time `options` asks for.
pub fn since(options: &LogOptions) -> Option<jiff::Timestamp> {
    if let Some(secs) = options.since_seconds {
        return jiff::Timestamp::now()
            .checked_sub(jiff::SignedDuration::from_secs(secs.max(0)))
            .ok();
    }
    options.since_time.as_deref().and_then(|t| t.parse().ok())
}

/// Follows `log` from `offset`: sends each new complete line to `lines` until `done` says
/// the writer is gone and the file is drained, or the receiver goes away (the client left).
pub async fn follow(
    log: PathBuf,
    mut offset: u64,
    done: impl Fn() -> bool,
    lines: tokio::sync::mpsc::Sender<Line>,
) {
    use std::io::{Read, Seek, SeekFrom};
    let mut carry = String::new();
    loop {
        let finished = done();
        let mut chunk = Vec::new();
        if let Ok(mut file) = fs::File::open(&log) {
            let len = file.metadata().map(|m| m.len()).unwrap_or(0);
            if len < offset {
                // Rotated: the new file starts over.
                offset = 0;
            }
            if file.seek(SeekFrom::Start(offset)).is_ok() {
                let _ = file.read_to_end(&mut chunk);
            }
        }
        if let Some(end) = chunk.iter().rposition(|b| *b == b'\n') {
            offset += (end + 1) as u64;
            carry.push_str(&String::from_utf8_lossy(&chunk[..end + 1]));
            let (complete, partial) = parse(&carry);
            carry = partial
                .map(|p| format!("{} {} P {}\n", p.time, p.stream, p.text))
                .unwrap_or_default();
            for line in complete {
                if lines.send(line).await.is_err() {
                    return;
                }
            }
        }
        if finished || lines.is_closed() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LOG: &str = "2026-01-01T00:00:00.000000001Z stdout F one\n\
                       2026-01-01T00:00:01.000000000Z stderr P tw\n\
                       2026-01-01T00:00:01.000000001Z stderr F o\n\
                       2026-01-01T00:00:02.000000000Z stdout F three\n";

    #[test]
    fn partials_join() {
        let (lines, partial) = parse(LOG);
        let texts: Vec<&str> = lines.iter().map(|l| l.text.as_str()).collect();
        assert_eq!(texts, ["one", "two", "three"]);
        assert_eq!(lines[1].stream, "stderr");
        assert!(partial.is_none());
        let (_, partial) = parse("2026-01-01T00:00:00Z stdout P half");
        assert_eq!(partial.unwrap().text, "half");
    }

    #[test]
    fn tail_since_and_rotation() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("0.log");
        fs::write(
            dir.path().join("0.log.1"),
            "2025-01-01T00:00:00Z stdout F old\n",
        )
        .unwrap();
        fs::write(&log, LOG).unwrap();
        let all = read(&log, &LogOptions::default()).0;
        assert_eq!(all.len(), 4);
        assert_eq!(all[0].text, "old");
        let tail = read(
            &log,
            &LogOptions {
                tail_lines: Some(2),
                ..LogOptions::default()
            },
        )
        .0;
        assert_eq!(
            tail.iter().map(|l| l.text.as_str()).collect::<Vec<_>>(),
            ["two", "three"]
        );
        let since = read(
            &log,
            &LogOptions {
                since_time: Some("2026-01-01T00:00:01Z".into()),
                ..LogOptions::default()
            },
        )
        .0;
        assert_eq!(since.len(), 2);
        assert_eq!(all[1].render(true), "2026-01-01T00:00:00.000000001Z one\n");
    }

    #[test]
    fn query_flags() {
        let o: LogOptions =
            serde_urlencoded::from_str("follow=true&tailLines=5&timestamps=true&container=c")
                .unwrap();
        assert!(o.follow && o.timestamps && !o.previous);
        assert_eq!(o.tail_lines, Some(5));
        assert_eq!(o.container.as_deref(), Some("c"));
    }
}
