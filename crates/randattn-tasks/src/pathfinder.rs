//! Pathfinder (Linsley et al. 2018; Kim et al. 2020), as the Long Range Arena uses it: are the
//! two marker disks the two ends of one dashed curve? Each image is a sequence of `size²` pixel
//! tokens; Path-X is the same task at 128×128.
//!
//! A reimplementation of the generator `snakes2.py` (drewlinsley/pathfinder) as the brief
//! describes it (`shared/papers/lra-glue-data.md` §3), at LRA's settings per size:
//!
//! - a **dash** ("paddle") is a straight segment of `paddle_length` px, drawn `thickness` wide;
//!   its **footprint** is the segment dilated by `margin`, and a new dash is accepted only where
//!   the occupancy mask plus its footprint stays below 1.8 (the border `padding` is occupied);
//! - a **snake** starts at a free position and angle (integer degrees) and grows dash by dash: the
//!   next dash's end is drawn on the circle of radius `L + margin` around a pivot `margin` px
//!   beyond the previous dash, with weight `max(cos(min(continuity·|Δθ|, π/2)), 0)²` times the
//!   free space there (inverse CDF, up to 3 tries), so consecutive dashes leave a gap of about
//!   `2·margin` px and turn by at most `π/(2·continuity)`; the mask takes each dash's footprint
//!   one step late, so a dash may touch its predecessor's clearance but nothing older;
//! - two **target snakes** of `contour_length` dashes (6 / 9 / 14 for easy / intermediate /
//!   hard): A's first tail in the centre (a band of `2·seed_distance` px at the border is
//!   barred), B's at `seed_distance` px from it, grown alternately, restarted on any failure;
//! - **distractors**: `distractors` snakes of `contour_length / 3` dashes (LRA's budget: 20 dashes
//!   at size 32, 22 at 64, 35 at 128; the `distractors` parameter sets another count), seeded anywhere free
//!   (5 tries each; an incomplete set is allowed); no single-dash clutter (LRA's images look
//!   uncluttered, as the public wrapper's `use_single_paddles = False` gives);
//! - **markers**: label 1 or 0 with probability ½; one snake `o` is chosen; a disk of
//!   `marker_radius` at `o`'s origin tip and one at `o`'s terminal tip (label 1) or at the other
//!   snake's (label 0);
//! - target dashes have intensity `snake_contrast × paddle_contrast`, distractors
//!   `snake_contrast`, markers 1; drawing is done at `antialias`× resolution and box-averaged
//!   down; the image is min–max scaled to 0–255 (as `scipy.misc.imsave` did).
//!
//! Deliberate differences: a box filter instead of Lanczos for the down-sampling, and footprint
//! dilation by distance to the segment instead of PIL lines and cv2 dilation (the brief: "any
//! anti-aliased rasteriser and binary dilation are equivalent"). Example `i` of a split comes from
//! the stream `(seed, split, i)`; an image belongs to the split its hash names (shares 58/21/21), as in
//! the other generated tasks. LRA masks pixel value 0 as padding (`pad_black`, on by default, as
//! for `image`): in Pathfinder that is most of the image.

use std::f64::consts::PI;
use std::ops::Range;

use rand::Rng;
use randattn::rng::StreamRng;

use crate::error::Result;
use crate::split::Split;
use crate::task::{Example, Task, TaskInfo, generate};

/// Split shares of the hash partition: proportional to √(split size) for 160k/20k/20k, which
/// minimises the candidates drawn in all.
const WEIGHTS: [u32; 3] = [58, 21, 21];

randattn::choice! {
    /// How long the two target curves are.
    pub enum Difficulty {
        /// 6 dashes per curve (`curv_baseline`).
        Easy = "easy",
        /// 9 dashes per curve (`curv_contour_length_9`).
        Intermediate = "intermediate",
        /// 14 dashes per curve (`curv_contour_length_14`, LRA's Pathfinder and Path-X).
        Hard = "hard",
    }
}

randattn::method_params! {
    /// Pathfinder `pathfinder`. See the module documentation.
    #[derive(Debug, Clone, PartialEq)]
    pub struct Pathfinder {
        /// image side in pixels: 32 (LRA's Pathfinder), 64, or 128 (Path-X)
        pub size: usize = 32,
            randattn::params::Rule::new("32, 64 or 128", |s: &usize| [32, 64, 128].contains(s));
        /// target curve length: easy (6 dashes), intermediate (9) or hard (14)
        pub difficulty: Difficulty = Difficulty::Hard;
        /// pixel value 0 is the pad token, as LRA does (black pixels are masked out)
        pub pad_black: bool = true;
        /// distractor snakes per image: `auto` is LRA's budget (e.g. 10 at size 32, easy); fewer make
        /// an easier task; at most 64 (on a crowded canvas each further snake searches every
        /// position: 1,000 took seconds per image, 100 at size 128 four)
        pub distractors: randattn::params::Auto<usize> = randattn::params::Auto::Auto,
            randattn::params::auto("LRA's budget", randattn::params::in_range(0, 64));
    }
}

/// The generator's settings at one image size (the brief's §3.1 table).
#[derive(Debug, Clone, Copy)]
struct Settings {
    size: usize,
    padding: f64,
    aa: usize,
    paddle_length: f64,
    thickness: f64,
    /// Margins to choose from per image (Path-X draws 2 or 3).
    margins: &'static [f64],
    marker_radius: f64,
    seed_distance: f64,
    contour_length: usize,
    continuity: f64,
    distractor_length: usize,
    distractors: usize,
    snake_contrast: f64,
    paddle_contrast: f64,
}

impl Pathfinder {
    fn settings(&self) -> Settings {
        let contour_length = match self.difficulty {
            Difficulty::Easy => 6,
            Difficulty::Intermediate => 9,
            Difficulty::Hard => 14,
        };
        let distractor_length = (contour_length / 3).max(1);
        let (
            paddle_length,
            thickness,
            margins,
            marker_radius,
            seed_distance,
            continuity,
            budget,
            contrast,
            paddle_contrast,
        ): (f64, f64, &'static [f64], f64, f64, f64, usize, f64, f64) = match self.size {
            32 => (2.0, 0.5, &[1.0], 1.5, 7.0, 1.0, 20, 2.0, 0.75),
            64 => (5.0, 1.0, &[1.0], 2.5, 12.0, 1.8, 22, 0.8, 1.0),
            _ => (5.0, 1.5, &[2.0, 3.0], 3.0, 20.0, 1.8, 35, 0.9, 1.0),
        };
        Settings {
            size: self.size,
            padding: 1.0,
            aa: 2,
            paddle_length,
            thickness,
            margins,
            marker_radius,
            seed_distance,
            contour_length,
            continuity,
            distractor_length,
            distractors: self
                .distractors
                .fixed()
                .unwrap_or(budget / distractor_length),
            snake_contrast: contrast,
            paddle_contrast,
        }
    }
}

/// A point in pixel units: `(row, col)`.
type Point = (f64, f64);

/// One dash: a segment from `a` to `b`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Dash {
    /// Start (the end nearer the previous dash).
    pub a: Point,
    /// End.
    pub b: Point,
}

/// A curve as drawn: its dashes in order.
#[derive(Debug, Clone, PartialEq)]
pub struct Snake {
    /// The dashes, first to last.
    pub dashes: Vec<Dash>,
}

impl Snake {
    /// The first dash's tail.
    pub fn origin(&self) -> Point {
        self.dashes[0].a
    }
    /// The last dash's head.
    pub fn terminal(&self) -> Point {
        self.dashes[self.dashes.len() - 1].b
    }
}

/// One generated image before scaling, with what drew it.
#[derive(Debug, Clone)]
pub struct Drawing {
    /// Pixel values 0–255, row-major `size × size`.
    pub pixels: Vec<u8>,
    /// 1 when both markers are the ends of one snake.
    pub label: u32,
    /// The two marker centres.
    pub markers: [Point; 2],
    /// The two target snakes.
    pub targets: [Snake; 2],
    /// The distractor snakes.
    pub distractors: Vec<Snake>,
    /// The margin used (gap and clearance).
    pub margin: f64,
}

/// Squared distance from `p` to the segment `a`–`b`.
fn seg_dist2(p: Point, a: Point, b: Point) -> f64 {
    let (dx, dy) = (b.0 - a.0, b.1 - a.1);
    let len2 = dx * dx + dy * dy;
    let t = if len2 > 0.0 {
        (((p.0 - a.0) * dx + (p.1 - a.1) * dy) / len2).clamp(0.0, 1.0)
    } else {
        0.0
    };
    let (qx, qy) = (a.0 + t * dx - p.0, a.1 + t * dy - p.1);
    qx * qx + qy * qy
}

/// The canvas: occupancy at pixel resolution, intensity at `aa`× resolution.
struct Canvas {
    s: Settings,
    margin: f64,
    /// Occupancy in [0, 1], `size × size`.
    mask: Vec<f64>,
    /// Intensity at `aa`×, `(size·aa)²`.
    image: Vec<f64>,
}

impl Canvas {
    fn new(s: Settings, margin: f64) -> Canvas {
        let n = s.size;
        let mut mask = vec![0.0; n * n];
        let pad = s.padding as usize;
        for r in 0..n {
            for c in 0..n {
                if r < pad || c < pad || r >= n - pad || c >= n - pad {
                    mask[r * n + c] = 1.0;
                }
            }
        }
        Canvas {
            s,
            margin,
            mask,
            image: vec![0.0; n * s.aa * n * s.aa],
        }
    }

    /// The dash's footprint: for each pixel near it, the share of its `aa × aa` sub-samples
    /// within `margin + thickness/2` of the segment. Calls `f(index, share)`.
    fn footprint(&self, d: Dash, mut f: impl FnMut(usize, f64)) {
        let (n, aa) = (self.s.size, self.s.aa);
        let reach = self.margin + self.s.thickness / 2.0;
        let (lo_r, hi_r) = (d.a.0.min(d.b.0) - reach, d.a.0.max(d.b.0) + reach);
        let (lo_c, hi_c) = (d.a.1.min(d.b.1) - reach, d.a.1.max(d.b.1) + reach);
        let r0 = lo_r.floor().max(0.0) as usize;
        let r1 = (hi_r.ceil() as isize).clamp(0, n as isize) as usize;
        let c0 = lo_c.floor().max(0.0) as usize;
        let c1 = (hi_c.ceil() as isize).clamp(0, n as isize) as usize;
        let step = 1.0 / aa as f64;
        for r in r0..r1 {
            for c in c0..c1 {
                let mut hit = 0usize;
                for i in 0..aa {
                    for j in 0..aa {
                        let p = (
                            r as f64 + (i as f64 + 0.5) * step,
                            c as f64 + (j as f64 + 0.5) * step,
                        );
                        if seg_dist2(p, d.a, d.b) <= reach * reach {
                            hit += 1;
                        }
                    }
                }
                if hit > 0 {
                    f(r * n + c, hit as f64 / (aa * aa) as f64);
                }
            }
        }
    }

    /// The occupancy dilated by a disk of radius `margin`: the largest mask value within
    /// `margin` of the pixel holding `p` (what the candidate weights of an extension use).
    fn dilated_mask(&self, p: Point) -> f64 {
        let n = self.s.size as isize;
        let (r, c) = (p.0 as isize, p.1 as isize);
        let reach = self.margin.floor() as isize;
        let mut most = 0.0f64;
        for dr in -reach..=reach {
            for dc in -reach..=reach {
                let (rr, cc) = (r + dr, c + dc);
                if (dr * dr + dc * dc) as f64 <= self.margin * self.margin
                    && rr >= 0
                    && cc >= 0
                    && rr < n
                    && cc < n
                {
                    most = most.max(self.mask[(rr * n + cc) as usize]);
                }
            }
        }
        most
    }

    /// Whether the dash fits: inside the image and `mask + footprint < 1.8` everywhere.
    fn fits(&self, d: Dash) -> bool {
        let n = self.s.size as f64;
        let inside = |p: Point| p.0 >= 0.0 && p.1 >= 0.0 && p.0 < n && p.1 < n;
        if !inside(d.a) || !inside(d.b) {
            return false;
        }
        let mut ok = true;
        self.footprint(d, |i, share| {
            if self.mask[i] + share >= 1.8 {
                ok = false;
            }
        });
        ok
    }

    fn occupy(&mut self, d: Dash) {
        let mut cells = Vec::new();
        self.footprint(d, |i, share| cells.push((i, share)));
        for (i, share) in cells {
            self.mask[i] = (self.mask[i] + share).min(1.0);
        }
    }

    /// Draws the dash `thickness` wide (at least one sub-pixel) with `value` (max blending).
    fn draw(&mut self, d: Dash, value: f64) {
        let (n, aa) = (self.s.size, self.s.aa);
        let m = n * aa;
        let half = (self.s.thickness / 2.0).max(0.5 / aa as f64);
        let scale = aa as f64;
        let lo_r = ((d.a.0.min(d.b.0) - half) * scale).floor().max(0.0) as usize;
        let hi_r = (((d.a.0.max(d.b.0) + half) * scale).ceil() as usize).min(m);
        let lo_c = ((d.a.1.min(d.b.1) - half) * scale).floor().max(0.0) as usize;
        let hi_c = (((d.a.1.max(d.b.1) + half) * scale).ceil() as usize).min(m);
        for r in lo_r..hi_r {
            for c in lo_c..hi_c {
                let p = ((r as f64 + 0.5) / scale, (c as f64 + 0.5) / scale);
                if seg_dist2(p, d.a, d.b) <= half * half {
                    let px = &mut self.image[r * m + c];
                    *px = px.max(value);
                }
            }
        }
    }

    /// A filled disk of `radius` at `p`, value 1.
    fn disk(&mut self, p: Point, radius: f64) {
        let m = self.s.size * self.s.aa;
        let scale = self.s.aa as f64;
        for r in 0..m {
            for c in 0..m {
                let q = ((r as f64 + 0.5) / scale, (c as f64 + 0.5) / scale);
                let dd = (q.0 - p.0).powi(2) + (q.1 - p.1).powi(2);
                if dd <= radius * radius {
                    self.image[r * m + c] = 1.0f64.max(self.image[r * m + c]);
                }
            }
        }
    }

    /// Box-averaged to pixel resolution and min–max scaled to 0–255.
    fn pixels(&self) -> Vec<u8> {
        let (n, aa) = (self.s.size, self.s.aa);
        let m = n * aa;
        let mut out = vec![0.0f64; n * n];
        for r in 0..m {
            for c in 0..m {
                out[(r / aa) * n + c / aa] += self.image[r * m + c];
            }
        }
        let (lo, hi) = out
            .iter()
            .fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), v| {
                (a.min(*v), b.max(*v))
            });
        let span = (hi - lo).max(1e-12);
        out.iter()
            .map(|v| ((v - lo) / span * 255.0).round() as u8)
            .collect()
    }
}

/// A snake while it grows: its dashes, the pivot of the next one and its direction.
struct Growing {
    dashes: Vec<Dash>,
    pivot: Point,
    theta: f64,
}

/// Unit vector of angle `theta` in (row, col).
fn dir(theta: f64) -> Point {
    (theta.sin(), theta.cos())
}

impl Pathfinder {
    /// Seeds a snake whose first tail lies inside `allowed` (row and col ranges); `None` when no
    /// position fits after the retries.
    fn seed_snake(
        &self,
        cv: &Canvas,
        rng: &mut StreamRng,
        allowed: (Range<f64>, Range<f64>),
        tries: usize,
    ) -> Option<Growing> {
        let s = cv.s;
        let l = s.paddle_length;
        let (rows, cols) = (
            (allowed.0.start.max(0.0) as usize)..(allowed.0.end.min(s.size as f64).ceil() as usize),
            (allowed.1.start.max(0.0) as usize)..(allowed.1.end.min(s.size as f64).ceil() as usize),
        );
        let cells = rows.len() * cols.len();
        for _ in 0..tries {
            let theta = (rng.random_range(-180..180) as f64).to_radians();
            let u = dir(theta);
            let legal_at = |p: Point| {
                allowed.0.contains(&p.0)
                    && allowed.1.contains(&p.1)
                    && cv.fits(Dash {
                        a: p,
                        b: (p.0 + l * u.0, p.1 + l * u.1),
                    })
            };
            // A uniform pick among the legal positions: uniform draws until one is legal (the
            // same law), and the full list only when the draws keep missing.
            let mut pick = None;
            for _ in 0..64 {
                let k = rng.random_range(0..cells.max(1));
                let p = (
                    (rows.start + k / cols.len().max(1)) as f64 + 0.5,
                    (cols.start + k % cols.len().max(1)) as f64 + 0.5,
                );
                if legal_at(p) {
                    pick = Some(p);
                    break;
                }
            }
            let tail = match pick {
                Some(p) => p,
                None => {
                    let legal: Vec<Point> = rows
                        .clone()
                        .flat_map(|r| cols.clone().map(move |c| (r as f64 + 0.5, c as f64 + 0.5)))
                        .filter(|p| legal_at(*p))
                        .collect();
                    if legal.is_empty() {
                        continue;
                    }
                    legal[rng.random_range(0..legal.len())]
                }
            };
            let head = (tail.0 + l * u.0, tail.1 + l * u.1);
            return Some(Growing {
                dashes: vec![Dash { a: tail, b: head }],
                pivot: (tail.0 - cv.margin * u.0, tail.1 - cv.margin * u.1),
                theta,
            });
        }
        None
    }

    /// Grows `g` by one dash; `false` at a dead end. The previous dash's footprint enters the
    /// mask now (one step late).
    fn extend(&self, cv: &mut Canvas, rng: &mut StreamRng, g: &mut Growing) -> bool {
        let s = cv.s;
        let (l, m) = (s.paddle_length, cv.margin);
        let u = dir(g.theta);
        let pivot = (
            g.pivot.0 + (l + 2.0 * m) * u.0,
            g.pivot.1 + (l + 2.0 * m) * u.1,
        );
        let radius = l + m;
        let steps = ((2.0 * PI * radius).ceil() as usize).max(8);
        let n = s.size as f64;
        let mut cands: Vec<(Point, f64)> = Vec::with_capacity(steps);
        let mut total = 0.0;
        for k in 0..steps {
            let phi = 2.0 * PI * k as f64 / steps as f64;
            let p = (
                (pivot.0 + radius * phi.sin()).floor() + 0.5,
                (pivot.1 + radius * phi.cos()).floor() + 0.5,
            );
            if p.0 < 0.0 || p.1 < 0.0 || p.0 >= n || p.1 >= n || cands.iter().any(|(q, _)| *q == p)
            {
                continue;
            }
            let phi = (p.0 - pivot.0).atan2(p.1 - pivot.1);
            let mut delta = (phi - g.theta).rem_euclid(2.0 * PI);
            if delta > PI {
                delta = 2.0 * PI - delta;
            }
            let turn = (s.continuity * delta).min(PI / 2.0).cos().max(0.0);
            let free = 1.0 - cv.dilated_mask(p);
            let w = turn * turn * free.max(0.0);
            total += w;
            cands.push((p, w));
        }
        if total < 1e-4 {
            return false;
        }
        let prev = *g.dashes.last().expect("a growing snake has a dash");
        for _ in 0..3 {
            let target = rng.random::<f64>() * total;
            let mut acc = 0.0;
            let &(p, _) = cands
                .iter()
                .find(|(_, w)| {
                    acc += w;
                    acc > target
                })
                .unwrap_or(cands.last().expect("candidates"));
            let phi = (p.0 - pivot.0).atan2(p.1 - pivot.1);
            let v = dir(phi);
            let dash = Dash {
                a: (p.0 - l * v.0, p.1 - l * v.1),
                b: p,
            };
            if cv.fits(dash) {
                cv.occupy(prev);
                g.dashes.push(dash);
                g.pivot = pivot;
                g.theta = phi;
                return true;
            }
        }
        false
    }

    /// One image.
    pub fn draw(&self, rng: &mut StreamRng) -> Drawing {
        let s = self.settings();
        loop {
            let margin = s.margins[rng.random_range(0..s.margins.len())];
            let mut cv = Canvas::new(s, margin);
            let n = s.size as f64;
            let band = (2.0 * s.seed_distance).min(n / 2.0 - 1.0);
            let Some(mut a) = self.seed_snake(&cv, rng, (band..n - band, band..n - band), 3) else {
                continue;
            };
            let angle = (rng.random_range(-180..180) as f64).to_radians();
            let w = dir(angle);
            let tail_a = a.dashes[0].a;
            let tail_b = (
                tail_a.0 + s.seed_distance * w.0,
                tail_a.1 + s.seed_distance * w.1,
            );
            let theta_b = (rng.random_range(-180..180) as f64).to_radians();
            let ub = dir(theta_b);
            let head_b = (
                tail_b.0 + s.paddle_length * ub.0,
                tail_b.1 + s.paddle_length * ub.1,
            );
            let inside = |p: Point| p.0 >= 0.0 && p.1 >= 0.0 && p.0 < n && p.1 < n;
            if !inside(tail_b) || !inside(head_b) {
                continue;
            }
            let mut b = Growing {
                dashes: vec![Dash {
                    a: tail_b,
                    b: head_b,
                }],
                pivot: (tail_b.0 - margin * ub.0, tail_b.1 - margin * ub.1),
                theta: theta_b,
            };
            let mut ok = true;
            while ok && (a.dashes.len() < s.contour_length || b.dashes.len() < s.contour_length) {
                if a.dashes.len() < s.contour_length {
                    ok = self.extend(&mut cv, rng, &mut a);
                }
                if ok && b.dashes.len() < s.contour_length {
                    ok = self.extend(&mut cv, rng, &mut b);
                }
            }
            if !ok {
                continue;
            }
            cv.occupy(*a.dashes.last().expect("dashes"));
            cv.occupy(*b.dashes.last().expect("dashes"));
            let mut distractors = Vec::new();
            for _ in 0..s.distractors {
                if cv.mask.iter().filter(|m| **m < 1.0).count() * 100 < s.size * s.size {
                    break;
                }
                let Some(mut d) = self.seed_snake(&cv, rng, (0.0..n, 0.0..n), 5) else {
                    continue;
                };
                while d.dashes.len() < s.distractor_length && self.extend(&mut cv, rng, &mut d) {}
                cv.occupy(*d.dashes.last().expect("dashes"));
                distractors.push(Snake { dashes: d.dashes });
            }
            let targets = [Snake { dashes: a.dashes }, Snake { dashes: b.dashes }];
            let target_value = s.snake_contrast * s.paddle_contrast;
            for snake in &targets {
                for d in &snake.dashes {
                    cv.draw(*d, target_value);
                }
            }
            for snake in &distractors {
                for d in &snake.dashes {
                    cv.draw(*d, s.snake_contrast);
                }
            }
            let label = u32::from(rng.random_bool(0.5));
            let o = rng.random_range(0..2);
            let first = targets[o].origin();
            let second = if label == 1 {
                targets[o].terminal()
            } else {
                targets[1 - o].terminal()
            };
            cv.disk(first, s.marker_radius);
            cv.disk(second, s.marker_radius);
            return Drawing {
                pixels: cv.pixels(),
                label,
                markers: [first, second],
                targets,
                distractors,
                margin,
            };
        }
    }
}

impl Task for Pathfinder {
    const NAME: &'static str = "pathfinder";
    const SUMMARY: &'static str =
        "Pathfinder (LRA): are the two dots the ends of one dashed curve? size² pixel tokens";

    fn info(&self) -> TaskInfo {
        TaskInfo {
            vocab: 256 + usize::from(!self.pad_black),
            classes: 2,
            max_len: self.size * self.size,
            pad: 0,
            pad_in_data: self.pad_black,
        }
    }

    fn split_sizes(&self) -> Result<[usize; 3]> {
        Ok([160_000, 20_000, 20_000])
    }

    fn examples_within(
        &self,
        seed: u64,
        split: Split,
        range: Range<usize>,
        max_candidates: usize,
    ) -> Result<Vec<Example>> {
        self.validate()?;
        let shift = u32::from(!self.pad_black);
        generate(
            Self::NAME,
            seed,
            split,
            range,
            WEIGHTS,
            max_candidates,
            |rng| {
                let d = self.draw(rng);
                let lens: Vec<String> = d
                    .targets
                    .iter()
                    .map(|t| t.dashes.len().to_string())
                    .collect();
                let marker = |p: Point| format!("[{}, {}]", p.0.floor(), p.1.floor());
                Some(Example {
                    tokens: d.pixels.iter().map(|p| *p as u32 + shift).collect(),
                    label: d.label,
                    text: None,
                    meta: Some(format!(
                        "{{\"markers\": [{}, {}], \"target_lengths\": [{}]}}",
                        marker(d.markers[0]),
                        marker(d.markers[1]),
                        lens.join(", ")
                    )),
                })
            },
        )
    }
}
