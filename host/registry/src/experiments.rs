//! A/B experiments between two versions of a model (the seed's sixth
//! feature): units (a workspace, an HTTP client) are assigned an arm by a
//! hash of the experiment and the unit, once, and keep it; each completion
//! served in the experiment is recorded with its latency, then as accepted
//! (the editor ran `kiln.accepted`) or superseded (it asked again without
//! accepting it).
//!
//! The winner is decided by a mixture sequential probability ratio test
//! (mSPRT; Johari, Pekelis and Walsh, "Always Valid Inference"), whose
//! error stays under α however often it is looked at: the difference of
//! the arms' means (acceptance rate, or latency) against a normal mixture
//! of alternatives, a winner once the likelihood ratio passes 1/α. A
//! guardrail runs on every experiment whatever its metric: when the
//! treatment is slower than the control by more than a margin, or fails
//! more often, by the same test, the experiment stops and the control is
//! kept.

use super::{NOW, Registry, RegistryError, Result, audit};
use rusqlite::{OptionalExtension, params};
use serde::Serialize;

/// The error rate every decision is held to.
pub const ALPHA: f64 = 0.05;
/// Decided completions each arm needs before any decision.
pub const MIN_EVENTS: u64 = 30;
/// The guardrail's margins: the treatment's mean latency over the
/// control's by more than this share, its error rate over the control's by
/// more than this.
pub const LATENCY_MARGIN: f64 = 0.25;
pub const ERROR_MARGIN: f64 = 0.05;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Arm {
    A,
    B,
}

impl Arm {
    pub fn as_str(self) -> &'static str {
        match self {
            Arm::A => "a",
            Arm::B => "b",
        }
    }

    pub fn parse(s: &str) -> Option<Arm> {
        match s {
            "a" => Some(Arm::A),
            "b" => Some(Arm::B),
            _ => None,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Metric {
    Acceptance,
    Latency,
}

impl Metric {
    pub fn parse(s: &str) -> Option<Metric> {
        match s {
            "acceptance" => Some(Metric::Acceptance),
            "latency" => Some(Metric::Latency),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Metric::Acceptance => "acceptance",
            Metric::Latency => "latency",
        }
    }
}

#[derive(Clone, Debug, Serialize)]
pub struct Experiment {
    #[serde(skip)]
    pub id: i64,
    pub name: String,
    /// The model name both versions share.
    pub model: String,
    /// `name@version` of the control and of the treatment.
    pub a: String,
    pub b: String,
    /// The share of units given the treatment.
    pub split: f64,
    pub metric: Metric,
    /// `running` or `stopped`.
    pub state: String,
    pub winner: Option<Arm>,
    pub reason: Option<String>,
    pub started_at: String,
    pub stopped_at: Option<String>,
}

impl Experiment {
    /// The version of `arm`, `name@version`.
    pub fn version(&self, arm: Arm) -> &str {
        match arm {
            Arm::A => &self.a,
            Arm::B => &self.b,
        }
    }

    /// The arm a new unit gets: a hash of the experiment and the unit
    /// (FNV-1a, mixed; the same in every kiln) against the split.
    pub fn arm_for(&self, unit: &str) -> Arm {
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        for b in self.name.bytes().chain([0]).chain(unit.bytes()) {
            h ^= b as u64;
            h = h.wrapping_mul(0x0000_0100_0000_01b3);
        }
        // Mixed (murmur3's finalizer: FNV's high bits barely move
        // between units that differ in their last characters), then the
        // top 53 bits as a number in [0, 1).
        h ^= h >> 33;
        h = h.wrapping_mul(0xff51_afd7_ed55_8ccd);
        h ^= h >> 33;
        h = h.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
        h ^= h >> 33;
        let u = (h >> 11) as f64 / (1u64 << 53) as f64;
        if u < self.split { Arm::B } else { Arm::A }
    }
}

/// A sample's size, mean and variance (of one observation).
#[derive(Clone, Copy, Debug, Serialize)]
pub struct Sample {
    pub n: f64,
    pub mean: f64,
    pub var: f64,
}

impl Sample {
    /// `k` successes of `n`, the variance from the rate smoothed by one
    /// success and one failure (never zero).
    pub fn bernoulli(k: u64, n: u64) -> Sample {
        let (k, n) = (k as f64, n as f64);
        let p = (k + 1.0) / (n + 2.0);
        Sample {
            n,
            mean: if n > 0.0 { k / n } else { 0.0 },
            var: p * (1.0 - p),
        }
    }
}

/// The mSPRT of "the means of `a` and `b` differ by `null`" with a normal
/// mixture of variance `tau2` over the alternatives: the likelihood ratio
/// and the always-valid (1 - α) interval of `b - a`.
pub fn msprt(a: Sample, b: Sample, null: f64, tau2: f64) -> (f64, f64, [f64; 2]) {
    let v = a.var / a.n.max(1.0) + b.var / b.n.max(1.0);
    let diff = b.mean - a.mean;
    let d = diff - null;
    let lr = (v / (v + tau2)).sqrt() * (d * d * tau2 / (2.0 * v * (v + tau2))).exp();
    let half = (v * (v + tau2) / tau2 * (2.0 * (1.0 / ALPHA).ln() + ((v + tau2) / v).ln())).sqrt();
    (lr, diff, [diff - half, diff + half])
}

/// One arm's numbers.
#[derive(Clone, Debug, Serialize)]
pub struct ArmStats {
    pub arm: Arm,
    pub version: String,
    pub units: u64,
    pub served: u64,
    pub accepted: u64,
    pub superseded: u64,
    pub errors: u64,
    /// Accepted of accepted and superseded.
    pub acceptance: Option<f64>,
    pub mean_latency_ms: Option<f64>,
    pub mean_accepted_chars: Option<f64>,
    #[serde(skip)]
    latency: Sample,
}

/// Where an experiment stands.
#[derive(Clone, Debug, Serialize)]
pub struct Analysis {
    pub metric: Metric,
    /// The treatment's mean less the control's (acceptance rate, or ms).
    pub difference: Option<f64>,
    /// Its always-valid (1 - α) interval.
    pub interval: Option<[f64; 2]>,
    /// The mixture likelihood ratio; a winner at 1/α.
    pub likelihood_ratio: Option<f64>,
    pub threshold: f64,
    /// The arm that wins on the metric, once decided.
    pub winner: Option<Arm>,
    /// Why the control is kept regardless (latency or errors).
    pub guardrail: Option<String>,
    /// Decided completions each arm still needs before a decision.
    pub events_needed: u64,
}

#[derive(Clone, Debug, Serialize)]
pub struct Status {
    pub experiment: Experiment,
    pub arms: [ArmStats; 2],
    pub analysis: Analysis,
}

/// The decision from both arms' numbers.
pub fn analyse(metric: Metric, a: &ArmStats, b: &ArmStats) -> Analysis {
    let decided = |s: &ArmStats| s.accepted + s.superseded;
    let need = MIN_EVENTS.saturating_sub(decided(a).min(decided(b)));
    let mut out = Analysis {
        metric,
        difference: None,
        interval: None,
        likelihood_ratio: None,
        threshold: 1.0 / ALPHA,
        winner: None,
        guardrail: None,
        events_needed: need,
    };
    if a.latency.n >= MIN_EVENTS as f64 && b.latency.n >= MIN_EVENTS as f64 {
        let margin = LATENCY_MARGIN * a.latency.mean;
        let tau2 = (0.1 * a.latency.mean).powi(2).max(1e-6);
        let (lr, diff, _) = msprt(a.latency, b.latency, margin, tau2);
        if diff > margin && lr >= 1.0 / ALPHA {
            out.guardrail = Some(format!(
                "{}'s latency is {:.0} ms over {}'s {:.0} ms, beyond the {:.0} % margin",
                b.version,
                diff,
                a.version,
                a.latency.mean,
                LATENCY_MARGIN * 100.0
            ));
        }
    }
    let (ea, eb) = (
        Sample::bernoulli(a.errors, a.served),
        Sample::bernoulli(b.errors, b.served),
    );
    if a.served >= MIN_EVENTS && b.served >= MIN_EVENTS {
        let (lr, diff, _) = msprt(ea, eb, ERROR_MARGIN, 0.05f64.powi(2));
        if diff > ERROR_MARGIN && lr >= 1.0 / ALPHA && out.guardrail.is_none() {
            out.guardrail = Some(format!(
                "{} fails {:.1} % of completions against {:.1} % for {}",
                b.version,
                eb.mean * 100.0,
                ea.mean * 100.0,
                a.version
            ));
        }
    }
    let (sa, sb, tau2, higher_wins) = match metric {
        Metric::Acceptance => (
            Sample::bernoulli(a.accepted, decided(a)),
            Sample::bernoulli(b.accepted, decided(b)),
            0.05f64.powi(2),
            true,
        ),
        Metric::Latency => (
            a.latency,
            b.latency,
            (0.1 * a.latency.mean).powi(2).max(1e-6),
            false,
        ),
    };
    if sa.n == 0.0 || sb.n == 0.0 {
        return out;
    }
    let (lr, diff, interval) = msprt(sa, sb, 0.0, tau2);
    out.difference = Some(diff);
    out.interval = Some(interval);
    out.likelihood_ratio = Some(lr);
    if need == 0 && lr >= 1.0 / ALPHA {
        out.winner = Some(if (diff > 0.0) == higher_wins {
            Arm::B
        } else {
            Arm::A
        });
    }
    out
}

const SELECT: &str = "SELECT e.*, a.name || '@' || a.version AS a_label, b.name || '@' || b.version AS b_label \
    FROM ab_experiments e JOIN models a ON a.id = e.a_id JOIN models b ON b.id = e.b_id";

fn from_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<Experiment> {
    Ok(Experiment {
        id: r.get("id")?,
        name: r.get("name")?,
        model: r.get("model")?,
        a: r.get("a_label")?,
        b: r.get("b_label")?,
        split: r.get("split")?,
        metric: Metric::parse(&r.get::<_, String>("metric")?).unwrap_or(Metric::Acceptance),
        state: r.get("state")?,
        winner: r
            .get::<_, Option<String>>("winner")?
            .and_then(|w| Arm::parse(&w)),
        reason: r.get("reason")?,
        started_at: r.get("started_at")?,
        stopped_at: r.get("stopped_at")?,
    })
}

impl Registry {
    /// Starts experiment `name` between versions `a` (the control) and `b`
    /// of one model (`name@version` each), giving `split` of the units to
    /// `b`. One experiment runs per model at a time.
    pub fn start_experiment(
        &mut self,
        name: &str,
        a: &str,
        b: &str,
        split: f64,
        metric: Metric,
        actor: &str,
    ) -> Result<Experiment> {
        if name.is_empty() || name.contains(char::is_whitespace) {
            return Err(RegistryError::Refused(format!(
                "experiment name {name:?} must be a word without spaces"
            )));
        }
        if !(split > 0.0 && split < 1.0) {
            return Err(RegistryError::Refused(format!(
                "split {split} must be between 0 and 1 (the share of units given {b})"
            )));
        }
        let find = |spec: &str| -> Result<super::ModelRecord> {
            if !spec.contains('@') {
                return Err(RegistryError::Refused(format!(
                    "{spec}: name a version, as in {spec}@2 (`kiln models list` shows them)"
                )));
            }
            self.model(spec)?
                .ok_or_else(|| RegistryError::Refused(format!("there is no model {spec}")))
        };
        let (ma, mb) = (find(a)?, find(b)?);
        if ma.name != mb.name || ma.id == mb.id {
            return Err(RegistryError::Refused(format!(
                "an experiment compares two versions of one model; {a} and {b} are not"
            )));
        }
        if let Some(e) = self.experiment(name)? {
            return Err(RegistryError::Refused(format!(
                "there is already an experiment {name} ({}, started {}); choose another name",
                e.state, e.started_at
            )));
        }
        if let Some(e) = self.running_experiment(&ma.name)? {
            return Err(RegistryError::Refused(format!(
                "experiment {} already runs on {}; `kiln ab stop {}` first",
                e.name, ma.name, e.name
            )));
        }
        let tx = self.write()?;
        tx.execute(
            &format!(
                "INSERT INTO ab_experiments (name, model, a_id, b_id, split, metric, state, started_at) \
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, 'running', {NOW})"
            ),
            params![name, ma.name, ma.id, mb.id, split, metric.as_str()],
        )?;
        let detail = format!("{a} against {b}, {split} to b, by {}", metric.as_str());
        audit(
            &tx,
            actor,
            "experiment",
            "start",
            name,
            None,
            Some("running"),
            Some(&detail),
        )?;
        tx.commit()?;
        Ok(self.experiment(name)?.expect("just written"))
    }

    /// Stops experiment `name`, with the winner if one was decided.
    pub fn stop_experiment(
        &mut self,
        name: &str,
        winner: Option<Arm>,
        reason: &str,
        actor: &str,
    ) -> Result<Experiment> {
        let e = self
            .experiment(name)?
            .ok_or_else(|| RegistryError::Refused(format!("there is no experiment {name}")))?;
        if e.state != "running" {
            return Err(RegistryError::Refused(format!(
                "experiment {name} already stopped ({})",
                e.reason.as_deref().unwrap_or("")
            )));
        }
        let tx = self.write()?;
        tx.execute(
            &format!(
                "UPDATE ab_experiments SET state = 'stopped', winner = ?2, reason = ?3, stopped_at = {NOW} WHERE id = ?1"
            ),
            params![e.id, winner.map(Arm::as_str), reason],
        )?;
        audit(
            &tx,
            actor,
            "experiment",
            "stop",
            name,
            Some("running"),
            Some("stopped"),
            Some(reason),
        )?;
        tx.commit()?;
        Ok(self.experiment(name)?.expect("just written"))
    }

    pub fn experiments(&self) -> Result<Vec<Experiment>> {
        let mut stmt = self.conn.prepare(&format!("{SELECT} ORDER BY e.id"))?;
        let rows = stmt.query_map([], from_row)?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
    }

    /// The experiments running and those stopped in the last day, the
    /// newest first.
    pub fn recent_experiments(&self) -> Result<Vec<Experiment>> {
        let mut stmt = self.conn.prepare(&format!(
            "{SELECT} WHERE e.state = 'running' OR e.stopped_at >= strftime('%Y-%m-%dT%H:%M:%fZ', 'now', '-1 day') ORDER BY e.id DESC"
        ))?;
        let rows = stmt.query_map([], from_row)?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
    }

    pub fn experiment(&self, name: &str) -> Result<Option<Experiment>> {
        Ok(self
            .conn
            .query_row(&format!("{SELECT} WHERE e.name = ?1"), [name], from_row)
            .optional()?)
    }

    /// The experiment running on model `name`, if any.
    pub fn running_experiment(&self, model: &str) -> Result<Option<Experiment>> {
        Ok(self
            .conn
            .query_row(
                &format!("{SELECT} WHERE e.model = ?1 AND e.state = 'running'"),
                [model],
                from_row,
            )
            .optional()?)
    }

    /// The arm of `unit` in `e`: the one it was given, else a new one
    /// ([`Experiment::arm_for`]), recorded.
    pub fn assign(&mut self, e: &Experiment, unit: &str) -> Result<Arm> {
        let tx = self.write()?;
        tx.execute(
            &format!(
                "INSERT OR IGNORE INTO ab_assignments (experiment_id, unit, arm, assigned_at) VALUES (?1, ?2, ?3, {NOW})"
            ),
            params![e.id, unit, e.arm_for(unit).as_str()],
        )?;
        let arm: String = tx.query_row(
            "SELECT arm FROM ab_assignments WHERE experiment_id = ?1 AND unit = ?2",
            params![e.id, unit],
            |r| r.get(0),
        )?;
        tx.commit()?;
        Ok(Arm::parse(&arm).expect("checked by the schema"))
    }

    /// Records completion `completion` served by `arm` of `e` to `unit`:
    /// shown, with its latency, or an error.
    pub fn record_served(
        &mut self,
        e: &Experiment,
        arm: Arm,
        unit: &str,
        completion: &str,
        latency_ms: Option<f64>,
        error: bool,
    ) -> Result<()> {
        self.conn.execute(
            &format!(
                "INSERT OR IGNORE INTO ab_outcomes (experiment_id, arm, unit, completion, outcome, latency_ms, served_at) \
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, {NOW})"
            ),
            params![
                e.id,
                arm.as_str(),
                unit,
                completion,
                if error { "error" } else { "shown" },
                latency_ms
            ],
        )?;
        Ok(())
    }

    /// A shown completion was accepted (`chars` of it kept). False when
    /// `completion` is not one shown in a running experiment.
    pub fn record_accepted(&mut self, completion: &str, chars: Option<u64>) -> Result<bool> {
        let n = self.conn.execute(
            "UPDATE ab_outcomes SET outcome = 'accepted', accepted_chars = ?2, \
             accept_ms = (julianday('now') - julianday(served_at)) * 86400000.0 \
             WHERE completion = ?1 AND outcome IN ('shown', 'superseded') AND experiment_id IN \
             (SELECT id FROM ab_experiments WHERE state = 'running')",
            params![completion, chars.map(|c| c as i64)],
        )?;
        Ok(n > 0)
    }

    /// A shown completion was replaced by a newer request without being
    /// accepted. False when it is not one shown in an experiment.
    pub fn record_superseded(&mut self, completion: &str) -> Result<bool> {
        let n = self.conn.execute(
            "UPDATE ab_outcomes SET outcome = 'superseded' WHERE completion = ?1 AND outcome = 'shown'",
            [completion],
        )?;
        Ok(n > 0)
    }

    /// Both arms' numbers and the decision.
    pub fn experiment_status(&self, e: &Experiment) -> Result<Status> {
        let arm = |arm: Arm| -> Result<ArmStats> {
            let units: i64 = self.conn.query_row(
                "SELECT count(*) FROM ab_assignments WHERE experiment_id = ?1 AND arm = ?2",
                params![e.id, arm.as_str()],
                |r| r.get(0),
            )?;
            let row = self.conn.query_row(
                "SELECT count(*), \
                    sum(outcome = 'accepted'), sum(outcome = 'superseded'), sum(outcome = 'error'), \
                    count(latency_ms), avg(latency_ms), \
                    avg(latency_ms * latency_ms), avg(accepted_chars) \
                 FROM ab_outcomes WHERE experiment_id = ?1 AND arm = ?2",
                params![e.id, arm.as_str()],
                |r| {
                    Ok((
                        r.get::<_, i64>(0)? as u64,
                        r.get::<_, Option<i64>>(1)?.unwrap_or(0) as u64,
                        r.get::<_, Option<i64>>(2)?.unwrap_or(0) as u64,
                        r.get::<_, Option<i64>>(3)?.unwrap_or(0) as u64,
                        r.get::<_, i64>(4)? as f64,
                        r.get::<_, Option<f64>>(5)?,
                        r.get::<_, Option<f64>>(6)?,
                        r.get::<_, Option<f64>>(7)?,
                    ))
                },
            )?;
            let (served, accepted, superseded, errors, n_lat, mean, sq, chars) = row;
            let decided = accepted + superseded;
            let m = mean.unwrap_or(0.0);
            Ok(ArmStats {
                arm,
                version: e.version(arm).to_string(),
                units: units as u64,
                served,
                accepted,
                superseded,
                errors,
                acceptance: (decided > 0).then(|| accepted as f64 / decided as f64),
                mean_latency_ms: mean,
                mean_accepted_chars: chars,
                latency: Sample {
                    n: n_lat,
                    mean: m,
                    var: (sq.unwrap_or(0.0) - m * m).max(1e-9) * n_lat / (n_lat - 1.0).max(1.0),
                },
            })
        };
        let (a, b) = (arm(Arm::A)?, arm(Arm::B)?);
        let analysis = analyse(e.metric, &a, &b);
        Ok(Status {
            experiment: e.clone(),
            arms: [a, b],
            analysis,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A small deterministic generator (xorshift64*), for simulations.
    struct Rng(u64);
    impl Rng {
        fn unit(&mut self) -> f64 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            (self.0.wrapping_mul(0x2545_f491_4f6c_dd1d) >> 11) as f64 / (1u64 << 53) as f64
        }
    }

    fn stats(arm: Arm, accepted: u64, decided: u64) -> ArmStats {
        ArmStats {
            arm,
            version: format!("m@{}", arm.as_str()),
            units: 1,
            served: decided,
            accepted,
            superseded: decided - accepted,
            errors: 0,
            acceptance: None,
            mean_latency_ms: None,
            mean_accepted_chars: None,
            latency: Sample {
                n: 0.0,
                mean: 0.0,
                var: 0.0,
            },
        }
    }

    /// Simulates an experiment looked at after every 10 completions per
    /// arm, up to `max` per arm: the completions per arm when a winner was
    /// declared, and which.
    fn simulate(rng: &mut Rng, pa: f64, pb: f64, max: u64) -> Option<(u64, Arm)> {
        let (mut ka, mut kb) = (0, 0);
        for n in 1..=max {
            ka += (rng.unit() < pa) as u64;
            kb += (rng.unit() < pb) as u64;
            if n % 10 == 0 {
                let a = stats(Arm::A, ka, n);
                let b = stats(Arm::B, kb, n);
                if let Some(w) = analyse(Metric::Acceptance, &a, &b).winner {
                    return Some((n, w));
                }
            }
        }
        None
    }

    #[test]
    fn aa_experiments_declare_a_winner_in_at_most_five_percent_of_runs() {
        let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
        let runs = 400;
        let false_winners = (0..runs)
            .filter(|_| simulate(&mut rng, 0.3, 0.3, 3000).is_some())
            .count();
        eprintln!("A/A: {false_winners} of {runs} runs declared a winner");
        assert!(
            false_winners * 20 <= runs,
            "{false_winners} of {runs} A/A runs declared a winner"
        );
    }

    /// Completions per arm at which the test's statistic, with the true
    /// difference and variances, reaches the threshold.
    fn predicted_events(pa: f64, pb: f64) -> u64 {
        (10..100_000)
            .step_by(10)
            .find(|&n| {
                let s = |p: f64| Sample {
                    n: n as f64,
                    mean: p,
                    var: p * (1.0 - p),
                };
                msprt(s(pa), s(pb), 0.0, 0.05f64.powi(2)).0 >= 1.0 / ALPHA
            })
            .unwrap()
    }

    #[test]
    fn a_five_point_difference_is_found_within_the_events_predicted() {
        let mut rng = Rng(42);
        let predicted = predicted_events(0.30, 0.35);
        assert!((500..5000).contains(&predicted), "{predicted}");
        let mut found: Vec<u64> = Vec::new();
        let runs = 200;
        for _ in 0..runs {
            if let Some((n, w)) = simulate(&mut rng, 0.30, 0.35, 4 * predicted) {
                assert_eq!(w, Arm::B, "the worse arm won after {n}");
                found.push(n);
            }
        }
        found.sort_unstable();
        // Most runs find it; half of them by the predicted count.
        assert!(found.len() * 10 >= runs * 9, "{} of {runs}", found.len());
        let median = found[found.len() / 2];
        eprintln!(
            "A/B 30 % vs 35 %: found in {} of {runs} runs, median {median} completions per arm, predicted {predicted}",
            found.len()
        );
        assert!(
            median <= predicted,
            "median {median} > predicted {predicted}"
        );
    }

    #[test]
    fn units_keep_their_arm_and_the_split_holds() {
        let dir = tempfile::tempdir().unwrap();
        let mut r = Registry::open(&dir.path().join("kiln.db")).unwrap();
        for v in 1..=2 {
            let m = super::super::NewModel {
                name: "coder".into(),
                sha256: format!("{v:064}"),
                blob_path: dir.path().join(format!("b{v}")),
                architecture: "llama".into(),
                quant_type: "q4_0".into(),
                size_bytes: 1,
                parent_sha256: None,
                origin: None,
                chat_template: None,
                params: None,
                encrypted: false,
            };
            r.add_model(&m, "test").unwrap();
        }
        let bad = r.start_experiment("x", "coder", "coder@2", 0.5, Metric::Acceptance, "t");
        assert!(bad.unwrap_err().to_string().contains("name a version"));
        let bad = r.start_experiment("x", "coder@1", "coder@1", 0.5, Metric::Acceptance, "t");
        assert!(bad.is_err());
        let bad = r.start_experiment("x", "coder@1", "coder@2", 1.5, Metric::Acceptance, "t");
        assert!(bad.is_err());
        let e = r
            .start_experiment("x", "coder@1", "coder@2", 0.3, Metric::Acceptance, "t")
            .unwrap();
        assert_eq!((e.a.as_str(), e.b.as_str()), ("coder@1", "coder@2"));
        let again = r.start_experiment("y", "coder@1", "coder@2", 0.5, Metric::Acceptance, "t");
        assert!(again.unwrap_err().to_string().contains("already runs"));
        let arms: Vec<Arm> = (0..1000)
            .map(|i| r.assign(&e, &format!("unit{i}")).unwrap())
            .collect();
        let b = arms.iter().filter(|&&a| a == Arm::B).count();
        assert!((240..360).contains(&b), "{b} of 1000 to b at a 0.3 split");
        assert_eq!(r.assign(&e, "unit7").unwrap(), arms[7]);
        r.record_served(&e, arms[7], "unit7", "c1", Some(40.0), false)
            .unwrap();
        r.record_served(&e, arms[7], "unit7", "c2", Some(60.0), false)
            .unwrap();
        assert!(r.record_accepted("c1", Some(12)).unwrap());
        r.record_superseded("c2").unwrap();
        assert!(!r.record_accepted("nope", None).unwrap());
        let s = r.experiment_status(&e).unwrap();
        let mine = &s.arms[(arms[7] == Arm::B) as usize];
        assert_eq!((mine.served, mine.accepted, mine.superseded), (2, 1, 1));
        assert_eq!(mine.acceptance, Some(0.5));
        assert_eq!(mine.mean_latency_ms, Some(50.0));
        assert_eq!(s.analysis.events_needed, MIN_EVENTS);
        assert_eq!(r.recent_experiments().unwrap().len(), 1);
        let stopped = r.stop_experiment("x", None, "stopped by t", "t").unwrap();
        assert_eq!(r.recent_experiments().unwrap().len(), 1, "stopped today");
        assert_eq!(stopped.state, "stopped");
        assert!(r.running_experiment("coder").unwrap().is_none());
        let log = r.audit_log(10).unwrap();
        assert!(log.iter().any(|l| l.kind == "experiment"), "audited");
    }
}
