//! The statistics behind a report's intervals: the mean of a variant's repeated runs with
//! a 95% Student-t interval, and a 95% interval for the difference between two variants —
//! paired by seed when both ran the same seeds (the paired t-test), Welch's otherwise. A
//! difference is called real when its interval excludes zero (the two-sided test at the
//! 5% level).

use serde::{Deserialize, Serialize};

/// Two-sided confidence level of every interval.
pub const LEVEL: f64 = 0.95;

/// The mean of repeated measurements and its 95% interval.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct Estimate {
    pub n: usize,
    pub mean: f64,
    /// Sample standard deviation (n − 1 in the denominator); 0 for one run.
    pub sd: f64,
    /// Half the width of the 95% interval, mean ± half; `None` for one run (no
    /// interval can be drawn from one measurement).
    pub half: Option<f64>,
}

impl Estimate {
    /// The estimate from `xs`; `None` when there are none.
    pub fn of(xs: &[f64]) -> Option<Estimate> {
        let n = xs.len();
        if n == 0 {
            return None;
        }
        let mean = xs.iter().sum::<f64>() / n as f64;
        if n == 1 {
            return Some(Estimate {
                n,
                mean,
                sd: 0.0,
                half: None,
            });
        }
        let var = xs.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (n - 1) as f64;
        let sd = var.sqrt();
        let half = t_quantile(0.5 + LEVEL / 2.0, (n - 1) as f64) * sd / (n as f64).sqrt();
        Some(Estimate {
            n,
            mean,
            sd,
            half: Some(half),
        })
    }

    /// The squared standard error of the mean.
    fn se2(&self) -> f64 {
        self.sd * self.sd / self.n as f64
    }
}

/// How a difference was tested.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Test {
    /// The paired t interval of per-seed differences.
    Paired,
    /// Welch's unequal-variance t interval of the two means.
    Welch,
}

/// The difference between two means (a − b) with its 95% interval.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct Difference {
    pub mean: f64,
    /// Half the interval's width; `None` when a side has a single run (or one pair).
    pub half: Option<f64>,
    /// Degrees of freedom: pairs − 1, or Welch–Satterthwaite's (infinite when there is no
    /// spread at all).
    pub df: f64,
    pub test: Test,
}

/// What an interval says about a difference.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// The interval lies above zero.
    Higher,
    /// The interval lies below zero.
    Lower,
    /// The interval contains zero: no difference shown.
    Unclear,
    /// One run on a side: no interval, nothing tested.
    Untested,
}

impl Difference {
    /// a − b from runs keyed by seed: paired over the seeds both have when there are two
    /// or more, else Welch's over all of each side's runs.
    pub fn of(a: &[(u64, f64)], b: &[(u64, f64)]) -> Option<Difference> {
        let pairs: Vec<f64> = a
            .iter()
            .filter_map(|(seed, x)| b.iter().find(|(s, _)| s == seed).map(|(_, y)| x - y))
            .collect();
        if pairs.len() >= 2 {
            let e = Estimate::of(&pairs)?;
            return Some(Difference {
                mean: e.mean,
                half: e.half,
                df: (e.n - 1) as f64,
                test: Test::Paired,
            });
        }
        let values = |xs: &[(u64, f64)]| xs.iter().map(|p| p.1).collect::<Vec<f64>>();
        Some(Difference::between(
            &Estimate::of(&values(a))?,
            &Estimate::of(&values(b))?,
        ))
    }

    /// a − b from the two variants' estimates, by Welch's interval.
    pub fn between(a: &Estimate, b: &Estimate) -> Difference {
        let mean = a.mean - b.mean;
        if a.n < 2 || b.n < 2 {
            return Difference {
                mean,
                half: None,
                df: f64::NAN,
                test: Test::Welch,
            };
        }
        let (va, vb) = (a.se2(), b.se2());
        let se2 = va + vb;
        if se2 == 0.0 {
            // No spread at all (deterministic runs): the difference is exact.
            return Difference {
                mean,
                half: Some(0.0),
                df: f64::INFINITY,
                test: Test::Welch,
            };
        }
        let df = se2 * se2 / (va * va / (a.n - 1) as f64 + vb * vb / (b.n - 1) as f64);
        Difference {
            mean,
            half: Some(t_quantile(0.5 + LEVEL / 2.0, df) * se2.sqrt()),
            df,
            test: Test::Welch,
        }
    }

    pub fn verdict(&self) -> Verdict {
        match self.half {
            None => Verdict::Untested,
            Some(h) if self.mean - h > 0.0 => Verdict::Higher,
            Some(h) if self.mean + h < 0.0 => Verdict::Lower,
            Some(_) => Verdict::Unclear,
        }
    }
}

/// The p-quantile of Student's t distribution with `df` degrees of freedom (df may be
/// fractional, as Welch's is), by bisection on the distribution function.
pub fn t_quantile(p: f64, df: f64) -> f64 {
    if p == 0.5 {
        return 0.0;
    }
    if p < 0.5 {
        return -t_quantile(1.0 - p, df);
    }
    if df.is_infinite() {
        return normal_quantile(p);
    }
    let (mut lo, mut hi) = (0.0_f64, 1.0_f64);
    while t_cdf(hi, df) < p {
        hi *= 2.0;
        if hi > 1e12 {
            return f64::INFINITY;
        }
    }
    for _ in 0..200 {
        let mid = 0.5 * (lo + hi);
        if t_cdf(mid, df) < p {
            lo = mid;
        } else {
            hi = mid;
        }
        if hi - lo < 1e-12 * hi.max(1.0) {
            break;
        }
    }
    0.5 * (lo + hi)
}

/// P(T ≤ t) for Student's t with `df` degrees of freedom:
/// 1 − ½·I_{df/(df+t²)}(df/2, ½) for t ≥ 0.
pub fn t_cdf(t: f64, df: f64) -> f64 {
    let x = df / (df + t * t);
    let tail = 0.5 * incomplete_beta(x, df / 2.0, 0.5);
    if t >= 0.0 {
        1.0 - tail
    } else {
        tail
    }
}

/// The standard normal quantile (for infinite degrees of freedom), by bisection on erf's
/// complement through the t machinery's limit: Φ(z) = ½·erfc(−z/√2).
fn normal_quantile(p: f64) -> f64 {
    let (mut lo, mut hi) = (-40.0_f64, 40.0_f64);
    for _ in 0..200 {
        let mid = 0.5 * (lo + hi);
        if 0.5 * erfc(-mid / std::f64::consts::SQRT_2) < p {
            lo = mid;
        } else {
            hi = mid;
        }
    }
    0.5 * (lo + hi)
}

/// erfc through the regularised incomplete gamma's relation erfc(x) = Q(½, x²), x ≥ 0.
fn erfc(x: f64) -> f64 {
    if x < 0.0 {
        return 2.0 - erfc(-x);
    }
    // Continued fraction for Q(a, z) (Numerical Recipes' gcf), a = ½.
    let (a, z) = (0.5, x * x);
    if z < a + 1.0 {
        // Series for P(a, z), then Q = 1 − P.
        let (mut sum, mut term, mut ap) = (1.0 / a, 1.0 / a, a);
        for _ in 0..500 {
            ap += 1.0;
            term *= z / ap;
            sum += term;
            if term.abs() < sum.abs() * 1e-16 {
                break;
            }
        }
        return 1.0 - sum * (-z + a * z.ln() - ln_gamma(a)).exp();
    }
    let tiny = 1e-300;
    let mut b = z + 1.0 - a;
    let mut c = 1.0 / tiny;
    let mut d = 1.0 / b;
    let mut h = d;
    for i in 1..500 {
        let an = -(i as f64) * (i as f64 - a);
        b += 2.0;
        d = an * d + b;
        if d.abs() < tiny {
            d = tiny;
        }
        c = b + an / c;
        if c.abs() < tiny {
            c = tiny;
        }
        d = 1.0 / d;
        let del = d * c;
        h *= del;
        if (del - 1.0).abs() < 1e-16 {
            break;
        }
    }
    (-z + a * z.ln() - ln_gamma(a)).exp() * h
}

/// The regularised incomplete beta function I_x(a, b) (Numerical Recipes' betai with
/// Lentz's continued fraction).
fn incomplete_beta(x: f64, a: f64, b: f64) -> f64 {
    if x <= 0.0 {
        return 0.0;
    }
    if x >= 1.0 {
        return 1.0;
    }
    let front = (ln_gamma(a + b) - ln_gamma(a) - ln_gamma(b) + a * x.ln() + b * (1.0 - x).ln()).exp();
    if x < (a + 1.0) / (a + b + 2.0) {
        front * beta_fraction(x, a, b) / a
    } else {
        1.0 - front * beta_fraction(1.0 - x, b, a) / b
    }
}

fn beta_fraction(x: f64, a: f64, b: f64) -> f64 {
    let tiny = 1e-300;
    let (qab, qap, qam) = (a + b, a + 1.0, a - 1.0);
    let mut c = 1.0;
    let mut d = 1.0 - qab * x / qap;
    if d.abs() < tiny {
        d = tiny;
    }
    d = 1.0 / d;
    let mut h = d;
    // One step of Lentz's method with coefficient `aa`: updates (c, d), returns d·c.
    let step = |aa: f64, c: &mut f64, d: &mut f64| {
        *d = 1.0 + aa * *d;
        if d.abs() < tiny {
            *d = tiny;
        }
        *c = 1.0 + aa / *c;
        if c.abs() < tiny {
            *c = tiny;
        }
        *d = 1.0 / *d;
        *d * *c
    };
    for m in 1..1000 {
        let m = m as f64;
        let m2 = 2.0 * m;
        h *= step(m * (b - m) * x / ((qam + m2) * (a + m2)), &mut c, &mut d);
        let del = step(-(a + m) * (qab + m) * x / ((a + m2) * (qap + m2)), &mut c, &mut d);
        h *= del;
        if (del - 1.0).abs() < 1e-15 {
            break;
        }
    }
    h
}

/// ln Γ(x) for x > 0 (Lanczos, g = 7, n = 9; ~1e-15 relative).
fn ln_gamma(x: f64) -> f64 {
    const G: [f64; 9] = [
        0.999_999_999_999_809_9,
        676.520_368_121_885_1,
        -1_259.139_216_722_402_8,
        771.323_428_777_653_1,
        -176.615_029_162_140_6,
        12.507_343_278_686_905,
        -0.138_571_095_265_720_12,
        9.984_369_578_019_572e-6,
        1.505_632_735_149_311_6e-7,
    ];
    if x < 0.5 {
        // Reflection: Γ(x)Γ(1−x) = π / sin(πx).
        let pi = std::f64::consts::PI;
        return (pi / (pi * x).sin()).ln() - ln_gamma(1.0 - x);
    }
    let x = x - 1.0;
    let mut sum = G[0];
    for (i, g) in G.iter().enumerate().skip(1) {
        sum += g / (x + i as f64);
    }
    let t = x + 7.5;
    0.5 * (2.0 * std::f64::consts::PI).ln() + (x + 0.5) * t.ln() - t + sum.ln()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn t_quantiles_match_the_printed_table() {
        // Two-sided 95% critical values from any statistics table.
        for (df, want) in [
            (1.0, 12.706),
            (2.0, 4.303),
            (3.0, 3.182),
            (4.0, 2.776),
            (5.0, 2.571),
            (10.0, 2.228),
            (30.0, 2.042),
            (120.0, 1.980),
            (f64::INFINITY, 1.960),
        ] {
            let got = t_quantile(0.975, df);
            assert!((got - want).abs() < 1.5e-3, "df {df}: {got} vs {want}");
        }
        // One-sided 95% at df 7 (1.895), and symmetry.
        assert!((t_quantile(0.95, 7.0) - 1.895).abs() < 1e-3);
        assert!((t_quantile(0.025, 3.0) + 3.182).abs() < 1e-3);
        // Fractional df lies between its neighbours.
        let f = t_quantile(0.975, 2.5);
        assert!(f < 4.303 && f > 3.182, "{f}");
    }

    #[test]
    fn an_interval_matches_a_hand_computation() -> Result<(), String> {
        // 70, 72, 74 (%): mean 72, sd 2, se 2/√3 = 1.1547, t(0.975, 2) = 4.3027:
        // half-width 4.9683.
        let e = Estimate::of(&[70.0, 72.0, 74.0]).ok_or("no estimate")?;
        assert!((e.mean - 72.0).abs() < 1e-12);
        assert!((e.sd - 2.0).abs() < 1e-12);
        let half = e.half.ok_or("no interval")?;
        assert!((half - 4.9683).abs() < 1e-3, "{half}");
        // One run: a mean and no interval.
        let one = Estimate::of(&[5.0]).ok_or("no estimate")?;
        assert_eq!((one.mean, one.half), (5.0, None));
        assert!(Estimate::of(&[]).is_none());
        Ok(())
    }

    #[test]
    fn welch_matches_a_hand_computation_and_calls_differences() -> Result<(), String> {
        // a = 70, 72, 74 (var 4); b = 60, 61, 62 (var 1). se² = 4/3 + 1/3 = 5/3,
        // df = (5/3)² / ((4/3)²/2 + (1/3)²/2) = 2.7778 / 0.9444 = 2.9412,
        // t(0.975, 2.9412) = 3.2188 (the t density integrated numerically in float64),
        // half = 3.2188·√(5/3) = 4.1554.
        let a = Estimate::of(&[70.0, 72.0, 74.0]).ok_or("a")?;
        let b = Estimate::of(&[60.0, 61.0, 62.0]).ok_or("b")?;
        let d = Difference::between(&a, &b);
        assert!((d.mean - 11.0).abs() < 1e-12);
        assert!((d.df - 2.9412).abs() < 1e-3, "{}", d.df);
        let half = d.half.ok_or("no interval")?;
        assert!((half - 4.1554).abs() < 1e-3, "{half}");
        assert_eq!(d.verdict(), Verdict::Higher);
        assert_eq!(Difference::between(&b, &a).verdict(), Verdict::Lower);
        // Overlapping samples: no difference shown.
        let c = Estimate::of(&[69.0, 73.0, 75.0]).ok_or("c")?;
        assert_eq!(Difference::between(&c, &a).verdict(), Verdict::Unclear);
        // A single run on one side: untested.
        let one = Estimate::of(&[90.0]).ok_or("one")?;
        assert_eq!(Difference::between(&one, &a).verdict(), Verdict::Untested);
        Ok(())
    }

    #[test]
    fn pairing_by_seed_matches_a_hand_computation() -> Result<(), String> {
        // Seeds 0, 1, 2: a = 70, 72, 74; b = 69, 70.5, 73. Per-seed differences 1, 1.5, 1:
        // mean 1.1667, sd 0.2887, se 0.1667, t(0.975, 2) = 4.3027, half-width 0.7172.
        let a = [(0, 70.0), (1, 72.0), (2, 74.0)];
        let b = [(0, 69.0), (1, 70.5), (2, 73.0)];
        let d = Difference::of(&a, &b).ok_or("no difference")?;
        assert_eq!(d.test, Test::Paired);
        assert!((d.mean - 1.1667).abs() < 1e-4, "{}", d.mean);
        assert!((d.half.ok_or("no interval")? - 0.7172).abs() < 1e-3, "{d:?}");
        assert_eq!(d.verdict(), Verdict::Higher);
        // The same numbers unpaired: the seed-to-seed spread hides the difference.
        let w = Difference::between(
            &Estimate::of(&[70.0, 72.0, 74.0]).ok_or("a")?,
            &Estimate::of(&[69.0, 70.5, 73.0]).ok_or("b")?,
        );
        assert_eq!(w.verdict(), Verdict::Unclear);
        // Seeds that do not match up: Welch's over all runs.
        let c = [(5, 69.0), (6, 70.5), (7, 73.0)];
        assert_eq!(Difference::of(&a, &c).ok_or("welch")?.test, Test::Welch);
        Ok(())
    }
}
