//! transformers' learning-rate schedules (`lr_scheduler_type` and `lr_scheduler_kwargs`), as the `LambdaLR`
//! factors of `transformers.optimization`: the factor on the base rate for the update after `step` completed ones.
use serde::{Deserialize, Serialize};

/// `lr_scheduler_type`, with transformers' names.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Schedule {
    Constant,
    ConstantWithWarmup,
    Linear,
    Cosine,
    CosineWithRestarts,
    Polynomial,
    InverseSqrt,
    CosineWithMinLr,
    CosineWarmupWithMinLr,
    WarmupStableDecay,
}

/// `lr_scheduler_kwargs`: the keyword arguments of transformers' schedule functions. Each schedule takes only
/// its own (transformers would fail on another with a `TypeError`; we name the key).
#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ScheduleKwargs {
    pub num_cycles: Option<f64>,
    pub lr_end: Option<f64>,
    pub power: Option<f64>,
    pub timescale: Option<usize>,
    pub min_lr: Option<f64>,
    pub min_lr_rate: Option<f64>,
    pub warmup_lr_rate: Option<f64>,
    pub num_decay_steps: Option<usize>,
    pub num_stable_steps: Option<usize>,
    pub warmup_type: Option<Shape>,
    pub decay_type: Option<Shape>,
    pub min_lr_ratio: Option<f64>,
}

/// The warm-up and decay curves of `warmup_stable_decay`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
pub enum Shape {
    #[serde(rename = "linear")]
    Linear,
    #[serde(rename = "cosine")]
    Cosine,
    #[serde(rename = "1-sqrt")]
    OneMinusSqrt,
}

/// A schedule with its arguments, over a run of `total` updates with `warmup` of them warming up.
#[derive(Debug, Clone, PartialEq)]
pub struct LrSchedule {
    pub kind: Schedule,
    pub kwargs: ScheduleKwargs,
    pub base_lr: f64,
    pub warmup: usize,
    pub total: usize,
}

impl Schedule {
    /// The `lr_scheduler_kwargs` keys this schedule's function takes.
    fn accepts(self) -> &'static [&'static str] {
        match self {
            Schedule::Constant | Schedule::ConstantWithWarmup | Schedule::Linear => &[],
            Schedule::Cosine | Schedule::CosineWithRestarts => &["num_cycles"],
            Schedule::Polynomial => &["lr_end", "power"],
            Schedule::InverseSqrt => &["timescale"],
            Schedule::CosineWithMinLr => &["num_cycles", "min_lr", "min_lr_rate"],
            Schedule::CosineWarmupWithMinLr => &["num_cycles", "min_lr", "min_lr_rate", "warmup_lr_rate"],
            Schedule::WarmupStableDecay => {
                &["num_decay_steps", "num_stable_steps", "warmup_type", "decay_type", "min_lr_ratio", "num_cycles"]
            }
        }
    }
}

impl LrSchedule {
    /// Checks the arguments as transformers' schedule functions do; `Err` names the key.
    pub fn check(&self) -> Result<(), String> {
        let name = serde_json::to_value(self.kind).ok().and_then(|v| v.as_str().map(String::from)).unwrap_or_default();
        let given = serde_json::to_value(&self.kwargs).unwrap_or_default();
        for (key, value) in given.as_object().into_iter().flatten().filter(|(_, v)| !v.is_null()) {
            if !self.kind.accepts().contains(&key.as_str()) {
                return Err(format!("lr_scheduler_kwargs.{key} = {value} is not an argument of the {name} schedule"));
            }
        }
        let kw = &self.kwargs;
        match self.kind {
            Schedule::Polynomial if kw.lr_end.unwrap_or(1e-7) >= self.base_lr => {
                Err(format!("lr_scheduler_kwargs.lr_end ({}) must be smaller than learning_rate ({})", kw.lr_end.unwrap_or(1e-7), self.base_lr))
            }
            Schedule::CosineWithMinLr | Schedule::CosineWarmupWithMinLr => match (kw.min_lr, kw.min_lr_rate) {
                (Some(_), Some(_)) => Err("lr_scheduler_kwargs: only one of min_lr or min_lr_rate should be set".into()),
                (None, None) => Err(format!("lr_scheduler_kwargs: the {name} schedule needs min_lr or min_lr_rate")),
                _ => Ok(()),
            },
            Schedule::WarmupStableDecay if kw.num_decay_steps.is_none() => {
                Err("lr_scheduler_kwargs: the warmup_stable_decay schedule needs num_decay_steps".into())
            }
            _ => Ok(()),
        }
    }

    /// The factor on the base learning rate for the update after `step` completed updates.
    pub fn factor(&self, step: usize) -> f64 {
        let (s, w, t) = (step as f64, self.warmup as f64, self.total as f64);
        let kw = &self.kwargs;
        let warming = step < self.warmup;
        let linear_warmup = s / w.max(1.0);
        let progress = (s - w) / (t - w).max(1.0);
        let cosine = |cycles: f64, p: f64| 0.5 * (1.0 + (std::f64::consts::PI * cycles * 2.0 * p).cos());
        let min_rate = || kw.min_lr_rate.unwrap_or_else(|| kw.min_lr.unwrap_or(0.0) / self.base_lr);
        match self.kind {
            Schedule::Constant => 1.0,
            _ if warming && !matches!(self.kind, Schedule::CosineWarmupWithMinLr | Schedule::WarmupStableDecay) => linear_warmup,
            Schedule::ConstantWithWarmup => 1.0,
            Schedule::Linear => ((t - s) / (t - w).max(1.0)).max(0.0),
            Schedule::Cosine => cosine(kw.num_cycles.unwrap_or(0.5), progress).max(0.0),
            Schedule::CosineWithRestarts => {
                if progress >= 1.0 {
                    return 0.0;
                }
                let cycles = kw.num_cycles.unwrap_or(1.0);
                (0.5 * (1.0 + (std::f64::consts::PI * ((cycles * progress) % 1.0)).cos())).max(0.0)
            }
            Schedule::Polynomial => {
                let (lr_end, lr_init) = (kw.lr_end.unwrap_or(1e-7), self.base_lr);
                if step > self.total {
                    return lr_end / lr_init;
                }
                let remaining = 1.0 - (s - w) / (t - w);
                ((lr_init - lr_end) * remaining.powf(kw.power.unwrap_or(1.0)) + lr_end) / lr_init
            }
            Schedule::InverseSqrt => {
                let timescale = kw.timescale.unwrap_or(if self.warmup > 0 { self.warmup } else { 10_000 }) as f64;
                1.0 / ((s + timescale - w) / timescale).sqrt()
            }
            Schedule::CosineWithMinLr => {
                let rate = min_rate();
                (cosine(kw.num_cycles.unwrap_or(0.5), progress) * (1.0 - rate) + rate).max(0.0)
            }
            Schedule::CosineWarmupWithMinLr => {
                // transformers' `_lr_rate` variant: warm-up reaches 1 at the last warm-up step (or climbs from
                // `warmup_lr_rate`), and the cosine starts one step further on.
                if warming {
                    return match kw.warmup_lr_rate {
                        None => (s + 1.0) / w.max(1.0),
                        Some(r) => r + (1.0 - r) * s / (w - 1.0).max(1.0),
                    };
                }
                let rate = min_rate();
                let progress = (s - w + 1.0) / (t - w).max(1.0);
                (cosine(kw.num_cycles.unwrap_or(0.5), progress) * (1.0 - rate) + rate).max(0.0)
            }
            Schedule::WarmupStableDecay => self.wsd(step),
        }
    }

    /// `_get_wsd_scheduler_lambda`.
    fn wsd(&self, step: usize) -> f64 {
        let kw = &self.kwargs;
        let decay = kw.num_decay_steps.unwrap_or(0);
        let stable = kw.num_stable_steps.unwrap_or_else(|| self.total.saturating_sub(self.warmup + decay));
        let ratio = kw.min_lr_ratio.unwrap_or(0.0);
        let curve = |shape: Shape, p: f64, rising: bool| match (shape, rising) {
            (Shape::Linear, true) => p,
            (Shape::Linear, false) => 1.0 - p,
            (Shape::Cosine, true) => 0.5 * (1.0 - (std::f64::consts::PI * p).cos()),
            (Shape::Cosine, false) => 0.5 * (1.0 + (std::f64::consts::PI * kw.num_cycles.unwrap_or(0.5) * 2.0 * p).cos()),
            (Shape::OneMinusSqrt, true) => 1.0 - (1.0 - p).sqrt(),
            (Shape::OneMinusSqrt, false) => 1.0 - p.sqrt(),
        };
        if step < self.warmup {
            let p = step as f64 / self.warmup.max(1) as f64;
            return (curve(kw.warmup_type.unwrap_or(Shape::Linear), p, true) * (1.0 - ratio) + ratio).max(0.0);
        }
        if step < self.warmup + stable {
            return 1.0;
        }
        if step < self.warmup + stable + decay {
            let p = (step - self.warmup - stable) as f64 / decay.max(1) as f64;
            return (curve(kw.decay_type.unwrap_or(Shape::Cosine), p, false) * (1.0 - ratio) + ratio).max(0.0);
        }
        ratio
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `kind`'s factor after `step` updates of `total`, `warmup` of them warming up, without kwargs.
    fn f(kind: Schedule, step: usize, warmup: usize, total: usize) -> f64 {
        LrSchedule { kind, kwargs: ScheduleKwargs::default(), base_lr: 1.0, warmup, total }.factor(step)
    }

    #[test]
    fn schedules_follow_transformers() {
        assert_eq!(f(Schedule::Linear, 0, 0, 10), 1.0);
        assert!((f(Schedule::Linear, 5, 0, 10) - 0.5).abs() < 1e-12);
        assert_eq!(f(Schedule::Linear, 1, 2, 10), 0.5);
        assert!((f(Schedule::Linear, 6, 2, 10) - 0.5).abs() < 1e-12);
        assert!((f(Schedule::Cosine, 6, 2, 10) - 0.5).abs() < 1e-12);
        assert_eq!(f(Schedule::ConstantWithWarmup, 1, 4, 10), 0.25);
        assert_eq!(f(Schedule::Constant, 1, 4, 10), 1.0);
    }
}
