//! Reading the Prometheus text format: the samples `/metrics` serves, and
//! the histograms they describe.

use std::collections::BTreeMap;

/// One line of the text format: `name{label="value",...} value`.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    pub name: String,
    pub labels: BTreeMap<String, String>,
    pub value: f64,
}

/// Reads every sample of a scrape; comments and blank lines are skipped.
/// A line that is not a sample is an error naming it.
pub fn parse(text: &str) -> Result<Vec<Sample>, String> {
    let mut samples = Vec::new();
    for (number, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let sample = parse_line(line).ok_or_else(|| {
            format!("line {} is not a sample: {line}", number + 1)
        })?;
        samples.push(sample);
    }
    Ok(samples)
}

fn parse_line(line: &str) -> Option<Sample> {
    let name_end = line.find(['{', ' '])?;
    let name = line[..name_end].to_owned();
    let mut rest = &line[name_end..];
    let mut labels = BTreeMap::new();
    if let Some(inside) = rest.strip_prefix('{') {
        let (parsed, after) = parse_labels(inside)?;
        labels = parsed;
        rest = after;
    }
    // A timestamp may follow the value; herald's exporter sends none.
    let value = rest.split_whitespace().next()?;
    let value = match value {
        "+Inf" => f64::INFINITY,
        "-Inf" => f64::NEG_INFINITY,
        other => other.parse().ok()?,
    };
    Some(Sample {
        name,
        labels,
        value,
    })
}

/// Reads `key="value",...}` and returns the labels and what follows the
/// closing brace. Values may hold `\"`, `\\` and `\n`.
fn parse_labels(mut text: &str) -> Option<(BTreeMap<String, String>, &str)> {
    let mut labels = BTreeMap::new();
    loop {
        text = text.trim_start_matches([',', ' ']);
        if let Some(after) = text.strip_prefix('}') {
            return Some((labels, after));
        }
        let (key, after_key) = text.split_once("=\"")?;
        let mut value = String::new();
        let mut chars = after_key.char_indices();
        let end = loop {
            match chars.next()? {
                (i, '"') => break i,
                (_, '\\') => match chars.next()?.1 {
                    'n' => value.push('\n'),
                    other => value.push(other),
                },
                (_, c) => value.push(c),
            }
        };
        labels.insert(key.trim().to_owned(), value);
        text = &after_key[end + 1..];
    }
}

/// A latency histogram: cumulative counts at each upper bound, with the
/// sum and count of what was observed.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Histogram {
    /// (upper bound, observations at or below it), by bound.
    pub buckets: Vec<(f64, f64)>,
    pub sum: f64,
    pub count: f64,
}

impl Histogram {
    /// Adds `other` into this one, bucket by bucket: the histogram of both
    /// sets of observations, when both have the same bounds (herald's do).
    pub fn merge(&mut self, other: &Histogram) {
        for &(bound, count) in &other.buckets {
            match self.buckets.iter_mut().find(|(b, _)| *b == bound) {
                Some((_, mine)) => *mine += count,
                None => self.buckets.push((bound, count)),
            }
        }
        self.buckets.sort_by(|a, b| a.0.total_cmp(&b.0));
        self.sum += other.sum;
        self.count += other.count;
    }

    pub fn mean(&self) -> Option<f64> {
        (self.count > 0.0).then(|| self.sum / self.count)
    }

    /// The `q` quantile (0 < q ≤ 1), estimated as Prometheus does: find
    /// the bucket the rank falls in and interpolate linearly within it,
    /// from zero for the first bucket. Above the last finite bound it is
    /// that bound. `max`, when known, caps the estimate, since no
    /// observation was larger.
    pub fn quantile(&self, q: f64, max: Option<f64>) -> Option<f64> {
        if self.count <= 0.0 {
            return None;
        }
        let rank = q * self.count;
        let (mut lower, mut below) = (0.0, 0.0);
        let mut estimate = None;
        for &(bound, cumulative) in &self.buckets {
            if cumulative >= rank {
                estimate = Some(if bound.is_infinite() {
                    lower
                } else {
                    let within = cumulative - below;
                    lower + (bound - lower) * ((rank - below) / within)
                });
                break;
            }
            (lower, below) = (bound, cumulative);
        }
        let estimate = estimate.unwrap_or(lower);
        Some(max.map_or(estimate, |max| estimate.min(max)))
    }
}

/// One group's histogram, merged over the processes it was read from,
/// with the count each process reported.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Group {
    pub histogram: Histogram,
    /// Observations by the value of the source label.
    pub counts: BTreeMap<String, f64>,
}

impl Group {
    /// Adds `other` into this group.
    pub fn merge(&mut self, other: &Group) {
        self.histogram.merge(&other.histogram);
        for (source, count) in &other.counts {
            *self.counts.entry(source.clone()).or_default() += count;
        }
    }
}

/// Gathers the histogram `family` (its `_bucket`, `_sum` and `_count`
/// samples) from `samples`, grouped by the value of the label `by`, each
/// group merged over its other labels; the label `source` says which
/// process a sample came from.
pub fn histograms_by(
    samples: &[Sample],
    family: &str,
    by: &str,
    source: &str,
) -> BTreeMap<String, Group> {
    // First one histogram per full label set, then merged by `by`.
    let mut series: BTreeMap<Vec<(String, String)>, Histogram> =
        BTreeMap::new();
    for sample in samples {
        let Some(part) = sample.name.strip_prefix(family) else {
            continue;
        };
        let mut labels = sample.labels.clone();
        let le = labels.remove("le");
        let key: Vec<_> = labels.into_iter().collect();
        let histogram = series.entry(key).or_default();
        match (part, le) {
            ("_bucket", Some(le)) => {
                let bound = match le.as_str() {
                    "+Inf" => f64::INFINITY,
                    le => match le.parse() {
                        Ok(bound) => bound,
                        Err(_) => continue,
                    },
                };
                histogram.buckets.push((bound, sample.value));
            }
            ("_sum", None) => histogram.sum = sample.value,
            ("_count", None) => histogram.count = sample.value,
            _ => {}
        }
    }

    let mut grouped: BTreeMap<String, Group> = BTreeMap::new();
    for (labels, mut histogram) in series {
        histogram.buckets.sort_by(|a, b| a.0.total_cmp(&b.0));
        let label = |name: &str| {
            labels.iter().find(|(key, _)| key == name).map(|(_, v)| v)
        };
        let Some(group) = label(by) else {
            continue;
        };
        let from = label(source).cloned().unwrap_or_default();
        let group = grouped.entry(group.clone()).or_default();
        *group.counts.entry(from).or_default() += histogram.count;
        group.histogram.merge(&histogram);
    }
    grouped
}

/// The largest value of the gauge `name` for each value of the label `by`.
pub fn max_by(
    samples: &[Sample],
    name: &str,
    by: &str,
) -> BTreeMap<String, f64> {
    let mut largest: BTreeMap<String, f64> = BTreeMap::new();
    for sample in samples.iter().filter(|s| s.name == name) {
        if let Some(group) = sample.labels.get(by) {
            let seen = largest.entry(group.clone()).or_insert(sample.value);
            *seen = seen.max(sample.value);
        }
    }
    largest
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn samples_with_and_without_labels_are_read() {
        let text = "# HELP x y\n\
                    up 1\n\
                    a_bucket{le=\"+Inf\",name=\"q\\\"uo\\\\te\"} 3\n";
        let samples = parse(text).unwrap();
        assert_eq!(samples.len(), 2);
        assert_eq!(samples[0].name, "up");
        assert_eq!(samples[0].value, 1.0);
        assert_eq!(samples[1].labels["le"], "+Inf");
        assert_eq!(samples[1].labels["name"], "q\"uo\\te");
    }

    #[test]
    fn a_line_that_is_not_a_sample_is_an_error_naming_it() {
        let error = parse("up 1\n<html>\n").unwrap_err();
        assert!(error.contains("line 2"), "{error}");
    }

    #[test]
    fn the_same_series_from_two_processes_adds_up() {
        let page = |source: &str, count: f64| {
            [("le", "1"), ("le", "+Inf")]
                .into_iter()
                .map(|(k, v)| Sample {
                    name: "d_bucket".into(),
                    labels: [(k, v), ("service", "s"), ("src", source)]
                        .into_iter()
                        .map(|(k, v)| (k.to_owned(), v.to_owned()))
                        .collect(),
                    value: count,
                })
                .chain(["d_sum", "d_count"].map(|name| {
                    Sample {
                        name: name.into(),
                        labels: [("service", "s"), ("src", source)]
                            .into_iter()
                            .map(|(k, v)| (k.to_owned(), v.to_owned()))
                            .collect(),
                        value: count,
                    }
                }))
                .collect::<Vec<_>>()
        };
        let samples = [page("a", 3.0), page("b", 5.0)].concat();
        let groups = histograms_by(&samples, "d", "service", "src");
        let group = &groups["s"];
        assert_eq!(group.histogram.count, 8.0);
        assert_eq!(group.histogram.sum, 8.0);
        assert_eq!(
            group.histogram.buckets,
            vec![(1.0, 8.0), (f64::INFINITY, 8.0)]
        );
        assert_eq!(group.counts["a"], 3.0);
        assert_eq!(group.counts["b"], 5.0);
    }

    #[test]
    fn quantiles_interpolate_within_their_bucket() {
        // 4 observations at or below 1, 4 more in (1, 2], none above.
        let histogram = Histogram {
            buckets: vec![(1.0, 4.0), (2.0, 8.0), (f64::INFINITY, 8.0)],
            sum: 10.0,
            count: 8.0,
        };
        assert_eq!(histogram.quantile(0.25, None), Some(0.5));
        assert_eq!(histogram.quantile(0.75, None), Some(1.5));
        assert_eq!(histogram.quantile(0.75, Some(1.2)), Some(1.2));
        assert_eq!(histogram.mean(), Some(1.25));
    }
}
