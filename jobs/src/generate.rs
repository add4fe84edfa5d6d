//! A deterministic generator of MovieLens-like ratings, so the default run, the tests and the
//! benchmarks need no third-party data and can scale to tens of millions of ratings.
//!
//! What makes it MovieLens-like:
//! - users and movies arrive over time (a user rates only after joining, a movie only after its
//!   release), so the newest ratings bring unseen users and movies, as a live system sees;
//! - activity and popularity are heavy-tailed (log-normal user activity, Zipf movie popularity);
//! - each user has a bias and a spread, each movie a quality, plus a small user×movie taste
//!   term, so per-user and per-movie statistics really predict a rating;
//! - some users rate in whole stars only, like MovieLens users from before half stars;
//! - a user rates a movie at most once, and timestamps never decrease.
//!
//! The same options and seed always give the same bytes (ChaCha8 is a portable generator).
//! It is a tool for the `movielens` pipeline's tests and demo, not pipeline logic: it writes
//! MovieLens' own CSV header and lines directly.

use std::io::Write;

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, LogNormal, Normal};
use rustc_hash::FxHashSet;

use crate::{JobError, Result};

/// The header of MovieLens' `ratings.csv`, which the `movielens` pipeline reads.
pub const CSV_HEADER: &str = "userId,movieId,rating,timestamp";

/// What to generate.
#[derive(Debug, Clone)]
pub struct GenerateOptions {
    /// Number of ratings (lines after the header).
    pub ratings: u64,
    /// Seed: the same seed gives the same file.
    pub seed: u64,
    /// Number of users; by default about one per 150 ratings, as in MovieLens.
    pub users: Option<u32>,
    /// Number of movies; by default about one per 11 ratings, at most 30,000.
    pub movies: Option<u32>,
    /// Unix seconds of the first rating.
    pub start_ts: i64,
    /// Seconds from the first rating to the last.
    pub span_secs: i64,
    /// Show a progress bar.
    pub progress: bool,
}

impl Default for GenerateOptions {
    fn default() -> Self {
        GenerateOptions {
            ratings: 100_000,
            seed: 42,
            users: None,
            movies: None,
            // MovieLens' own span: 1996 to 2016.
            start_ts: 828_000_000,
            span_secs: 20 * 365 * 86_400,
            progress: false,
        }
    }
}

/// What was generated.
#[derive(Debug, Clone, PartialEq)]
pub struct GenerateSummary {
    /// Ratings written.
    pub ratings: u64,
    /// Users in the population (not all need have rated).
    pub users: u32,
    /// Movies in the catalogue.
    pub movies: u32,
    /// Mean of the ratings written.
    pub mean_rating: f64,
}

impl GenerateOptions {
    fn users(&self) -> u32 {
        self.users.unwrap_or_else(|| (self.ratings / 150).clamp(10, u32::MAX as u64) as u32)
    }

    fn movies(&self) -> u32 {
        self.movies.unwrap_or_else(|| (self.ratings / 11).clamp(20, 30_000) as u32)
    }

    fn validate(&self) -> Result<()> {
        let bad = |option, reason: &str| Err(JobError::Config { option, reason: reason.to_string() });
        if self.users() == 0 {
            return bad("users", "must be at least 1");
        }
        if self.movies() == 0 {
            return bad("movies", "must be at least 1");
        }
        if (self.users() as u64) * (self.movies() as u64) < self.ratings * 2 {
            return bad("ratings", "too many for users × movies: each user rates a movie at most once");
        }
        if self.span_secs < 0 || self.start_ts < 0 {
            return bad("start", "timestamps must not be negative");
        }
        Ok(())
    }
}

/// One side of the population (users or movies): who exists by when, and how often each is picked.
struct Population {
    /// Running sum of pick weights in arrival order, so "pick among those arrived" is a binary
    /// search over a prefix.
    cumulative: Vec<f64>,
    /// Share of the population present at the start; the rest arrive evenly over the span.
    present_at_start: f64,
}

impl Population {
    fn new(weights: impl Iterator<Item = f64>, present_at_start: f64) -> Population {
        let mut sum = 0.0;
        let cumulative = weights
            .map(|w| {
                sum += w;
                sum
            })
            .collect();
        Population { cumulative, present_at_start }
    }

    /// Picks an index among those that have arrived at `progress` (0..1 through the span).
    fn pick(&self, rng: &mut ChaCha8Rng, progress: f64) -> usize {
        let n = self.cumulative.len();
        let arrived = ((n as f64) * (self.present_at_start + (1.0 - self.present_at_start) * progress)).ceil() as usize;
        let arrived = arrived.clamp(1, n);
        let target = rng.random::<f64>() * self.cumulative[arrived - 1];
        self.cumulative[..arrived].partition_point(|&c| c <= target).min(arrived - 1)
    }
}

const TASTE_DIMS: usize = 3;

struct User {
    bias: f64,
    spread: f64,
    whole_stars: bool,
    taste: [f64; TASTE_DIMS],
}

struct Movie {
    id: i64,
    quality: f64,
    taste: [f64; TASTE_DIMS],
}

/// Writes `opts.ratings` ratings as CSV (with the MovieLens header) to `out`.
pub fn generate(opts: &GenerateOptions, out: impl Write) -> Result<GenerateSummary> {
    opts.validate()?;
    let io = |e: std::io::Error| JobError::Io { path: "generated CSV".into(), source: e };
    let mut out = std::io::BufWriter::with_capacity(1 << 20, out);
    let mut rng = ChaCha8Rng::seed_from_u64(opts.seed);
    let (n_users, n_movies) = (opts.users() as usize, opts.movies() as usize);
    let unit = Normal::new(0.0, 1.0).map_err(|e| JobError::Internal(e.to_string()))?;
    let activity = LogNormal::new(0.0, 1.1).map_err(|e| JobError::Internal(e.to_string()))?;

    let users: Vec<User> = (0..n_users)
        .map(|_| User {
            bias: 0.45 * unit.sample(&mut rng),
            spread: (0.25 * unit.sample(&mut rng)).exp(),
            whole_stars: rng.random::<f64>() < 0.4,
            taste: std::array::from_fn(|_| 0.4 * unit.sample(&mut rng)),
        })
        .collect();
    let user_weights: Vec<f64> = (0..n_users).map(|_| activity.sample(&mut rng)).collect();

    // Popularity rank is independent of release order; popular movies are a little better.
    let mut ranks: Vec<usize> = (0..n_movies).collect();
    for i in (1..n_movies).rev() {
        ranks.swap(i, rng.random_range(0..=i));
    }
    let mut next_id = 0i64;
    let movies: Vec<Movie> = (0..n_movies)
        .map(|i| {
            // MovieLens ids have gaps (removed or never-rated titles).
            next_id += 1 + (rng.random::<f64>().powi(6) * 30.0) as i64;
            let popular = 1.0 - (ranks[i] as f64 / n_movies as f64);
            Movie { id: next_id, quality: 0.4 * unit.sample(&mut rng) + 0.3 * (popular - 0.5), taste: std::array::from_fn(|_| 0.4 * unit.sample(&mut rng)) }
        })
        .collect();
    let movie_weights = ranks.iter().map(|&r| 1.0 / (r as f64 + 8.0).powf(0.95));

    let user_pop = Population::new(user_weights.into_iter(), 0.05);
    let movie_pop = Population::new(movie_weights, 0.3);

    let bar = if opts.progress { crate::progress_bar(opts.ratings, "generate") } else { indicatif::ProgressBar::hidden() };
    writeln!(out, "{CSV_HEADER}").map_err(io)?;
    let mut seen: FxHashSet<u64> = FxHashSet::default();
    seen.reserve(opts.ratings as usize);
    let mut sum = 0.0;
    for i in 0..opts.ratings {
        let progress = i as f64 / opts.ratings.max(1) as f64;
        let ts = opts.start_ts + ((i as i128 * opts.span_secs as i128) / opts.ratings.max(1) as i128) as i64;
        // A user who has seen most of what exists is picked again; a few tries always suffice
        // in practice, and the bound keeps a tiny catalogue from looping forever.
        let (u, m) = (0..1000)
            .map(|_| (user_pop.pick(&mut rng, progress), movie_pop.pick(&mut rng, progress)))
            .find(|&(u, m)| seen.insert(((u as u64) << 32) | m as u64))
            .ok_or_else(|| JobError::Config { option: "ratings", reason: "users × movies too small to give every user distinct movies".into() })?;
        let (user, movie) = (&users[u], &movies[m]);
        let taste: f64 = user.taste.iter().zip(&movie.taste).map(|(a, b)| a * b).sum();
        let raw = 3.55 + user.bias + movie.quality + taste + 0.75 * user.spread * unit.sample(&mut rng);
        let rating = if user.whole_stars { raw.round().clamp(1.0, 5.0) } else { (raw * 2.0).round().clamp(1.0, 10.0) / 2.0 };
        sum += rating;
        writeln!(out, "{},{},{:.1},{}", u + 1, movie.id, rating, ts).map_err(io)?;
        if i % 65_536 == 0 {
            bar.set_position(i);
        }
    }
    bar.finish_and_clear();
    out.flush().map_err(io)?;
    Ok(GenerateSummary {
        ratings: opts.ratings,
        users: n_users as u32,
        movies: n_movies as u32,
        mean_rating: if opts.ratings > 0 { sum / opts.ratings as f64 } else { 0.0 },
    })
}

#[cfg(test)]
mod tests {
    use std::collections::{HashMap, HashSet};

    use lensflow_core::Pipeline;

    use super::*;
    use crate::events_csv::{CsvLine, EventsCsv};

    /// One generated rating.
    struct Rating {
        user_id: i64,
        movie_id: i64,
        rating: f64,
        timestamp: i64,
    }

    fn parse(bytes: &[u8]) -> Vec<Rating> {
        let text = std::str::from_utf8(bytes).unwrap();
        let mut lines = text.lines();
        assert_eq!(lines.next(), Some(CSV_HEADER));
        lines
            .map(|l| {
                let f: Vec<&str> = l.split(',').collect();
                Rating { user_id: f[0].parse().unwrap(), movie_id: f[1].parse().unwrap(), rating: f[2].parse().unwrap(), timestamp: f[3].parse().unwrap() }
            })
            .collect()
    }

    #[test]
    fn every_line_is_a_valid_movielens_event() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("g.csv");
        generate(&GenerateOptions { ratings: 20_000, ..Default::default() }, std::fs::File::create(&path).unwrap()).unwrap();
        let pipeline = Pipeline::builtin("movielens").unwrap().unwrap();
        let mut csv = EventsCsv::open(&path, &pipeline).unwrap();
        let mut n = 0;
        while let Some(line) = csv.next_line().unwrap() {
            match line {
                CsvLine::Event { .. } => n += 1,
                CsvLine::Reject(r) => panic!("line {}: {}", r.line, r.reason),
            }
        }
        assert_eq!(n, 20_000);
    }

    #[test]
    fn same_seed_same_bytes_other_seed_other_bytes() {
        let opts = GenerateOptions { ratings: 5_000, ..Default::default() };
        let (mut a, mut b, mut c) = (vec![], vec![], vec![]);
        generate(&opts, &mut a).unwrap();
        generate(&opts, &mut b).unwrap();
        generate(&GenerateOptions { seed: 7, ..opts }, &mut c).unwrap();
        assert_eq!(a, b);
        assert_ne!(a, c);
    }

    #[test]
    fn looks_like_movielens() {
        let opts = GenerateOptions { ratings: 100_000, ..Default::default() };
        let mut buf = vec![];
        let summary = generate(&opts, &mut buf).unwrap();
        let rows = parse(&buf);
        assert_eq!(rows.len(), 100_000);
        assert!((3.3..3.8).contains(&summary.mean_rating), "mean {}", summary.mean_rating);
        // Timestamps never decrease; a user rates a movie once.
        assert!(rows.windows(2).all(|w| w[0].timestamp <= w[1].timestamp));
        let pairs: HashSet<_> = rows.iter().map(|r| (r.user_id, r.movie_id)).collect();
        assert_eq!(pairs.len(), rows.len());
        // Liked share near MovieLens' ~48%, and whole stars dominate as in MovieLens.
        let liked = rows.iter().filter(|r| r.rating >= 4.0).count() as f64 / rows.len() as f64;
        assert!((0.35..0.6).contains(&liked), "liked share {liked}");
        let halves = rows.iter().filter(|r| r.rating.fract() != 0.0).count() as f64 / rows.len() as f64;
        assert!((0.1..0.45).contains(&halves), "half-star share {halves}");
        // Heavy tails: the busiest 10% of users and the top 10% of movies hold far more than 10%.
        for counts in [count_by(&rows, |r| r.user_id), count_by(&rows, |r| r.movie_id)] {
            let mut c: Vec<usize> = counts.into_values().collect();
            c.sort_unstable_by(|a, b| b.cmp(a));
            let top: usize = c[..c.len() / 10].iter().sum();
            assert!(top as f64 > 0.3 * rows.len() as f64, "top decile holds only {top}");
        }
        // Users differ in taste: per-user means spread well beyond sampling noise.
        let mut per_user: HashMap<i64, (f64, f64)> = HashMap::new();
        for r in &rows {
            let e = per_user.entry(r.user_id).or_default();
            e.0 += r.rating;
            e.1 += 1.0;
        }
        let means: Vec<f64> = per_user.values().filter(|(_, n)| *n >= 50.0).map(|(s, n)| s / n).collect();
        let avg = means.iter().sum::<f64>() / means.len() as f64;
        let sd = (means.iter().map(|m| (m - avg).powi(2)).sum::<f64>() / means.len() as f64).sqrt();
        assert!(sd > 0.3, "per-user mean spread {sd}");
    }

    fn count_by(rows: &[Rating], key: impl Fn(&Rating) -> i64) -> HashMap<i64, usize> {
        let mut m = HashMap::new();
        for r in rows {
            *m.entry(key(r)).or_default() += 1;
        }
        m
    }

    #[test]
    fn refuses_impossible_sizes() {
        let opts = GenerateOptions { ratings: 1_000, users: Some(2), movies: Some(10), ..Default::default() };
        let err = generate(&opts, std::io::sink()).unwrap_err().to_string();
        assert!(err.contains("--ratings"), "{err}");
    }
}
