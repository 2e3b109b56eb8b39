//! Pathfinder against its definition: balanced labels; the markers joined by bright pixels in
//! positives and (almost always) not in negatives; dash length and gaps as specified; markers at
//! the curves' tips; every size generates.

use std::collections::VecDeque;

use randattn::rng::stream;
use randattn_tasks::pathfinder::{Drawing, Pathfinder};
use randattn_tasks::{Split, TaskSpec};

/// Whether the two markers are joined by non-black pixels, allowing jumps of up to `reach`
/// pixels (the gaps between dashes are about two pixels at 32×32).
fn joined(d: &Drawing, size: usize, reach: isize) -> bool {
    let at = |p: (f64, f64)| (p.0.floor() as isize, p.1.floor() as isize);
    let (start, goal) = (at(d.markers[0]), at(d.markers[1]));
    let bright = |r: isize, c: isize| {
        r >= 0
            && c >= 0
            && (r as usize) < size
            && (c as usize) < size
            && d.pixels[r as usize * size + c as usize] > 0
    };
    let mut seen = vec![false; size * size];
    let mut queue = VecDeque::from([start]);
    seen[start.0 as usize * size + start.1 as usize] = true;
    while let Some((r, c)) = queue.pop_front() {
        if (r - goal.0).abs() <= 1 && (c - goal.1).abs() <= 1 {
            return true;
        }
        for dr in -reach..=reach {
            for dc in -reach..=reach {
                let (nr, nc) = (r + dr, c + dc);
                if bright(nr, nc) && !seen[nr as usize * size + nc as usize] {
                    seen[nr as usize * size + nc as usize] = true;
                    queue.push_back((nr, nc));
                }
            }
        }
    }
    false
}

fn drawings(p: &Pathfinder, count: usize) -> Vec<Drawing> {
    (0..count)
        .map(|i| p.draw(&mut stream(9, 0, i, "pathfinder-test")))
        .collect()
}

/// The share of drawings of each label whose markers are joined (2-px jumps).
fn joined_rates(ds: &[Drawing], size: usize) -> (f64, f64) {
    let rate = |label: u32| {
        let of: Vec<&Drawing> = ds.iter().filter(|d| d.label == label).collect();
        of.iter().filter(|d| joined(d, size, 2)).count() as f64 / of.len() as f64
    };
    (rate(1), rate(0))
}

#[test]
fn labels_are_balanced_and_positives_are_connected_negatives_less_often() {
    let hard = drawings(&Pathfinder::default(), 600);
    let positives = hard.iter().filter(|d| d.label == 1).count();
    // sd of the share at 600 is 0.02; allow 4 of them.
    assert!(
        (positives as f64 / 600.0 - 0.5).abs() < 0.08,
        "{positives} positives"
    );
    // Measured (seed 9): hard 32x32 joins 0.99 of positives and 0.97 of negatives — at LRA's
    // settings the curves and distractors fill the image and pass within 2 px of each other, so
    // pixel connectivity cannot tell; easy (6 dashes) joins 0.99 and 0.63.
    let (pos, neg) = joined_rates(&hard, 32);
    eprintln!("hard 32x32: markers joined in {pos:.3} of positives, {neg:.3} of negatives");
    assert!(pos > 0.95, "positives joined: {pos}");
    let easy = Pathfinder {
        difficulty: "easy".parse().unwrap(),
        ..Pathfinder::default()
    };
    let (pos, neg) = joined_rates(&drawings(&easy, 300), 32);
    eprintln!("easy 32x32: markers joined in {pos:.3} of positives, {neg:.3} of negatives");
    assert!(
        pos > 0.95 && pos - neg > 0.2,
        "easy: positives {pos} vs negatives {neg}"
    );
}

#[test]
fn dashes_have_the_specified_length_and_gaps_and_markers_sit_at_the_tips() {
    let p = Pathfinder::default();
    for d in drawings(&p, 200) {
        let m = d.margin;
        for (k, snake) in d.targets.iter().enumerate() {
            assert_eq!(snake.dashes.len(), 14, "target {k}: hard = 14 dashes");
            for w in snake.dashes.windows(2) {
                let len = ((w[1].b.0 - w[1].a.0).powi(2) + (w[1].b.1 - w[1].a.1).powi(2)).sqrt();
                assert!((len - 2.0).abs() < 1e-9, "dash length {len}");
                let gap = ((w[1].a.0 - w[0].b.0).powi(2) + (w[1].a.1 - w[0].b.1).powi(2)).sqrt();
                // 2·margin, give or take the truncation of the candidate to a pixel centre.
                assert!(gap > 0.0 && gap < 2.0 * m + 2f64.sqrt(), "gap {gap}");
            }
        }
        assert!(
            d.distractors
                .iter()
                .all(|s| !s.dashes.is_empty() && s.dashes.len() <= 4)
        );
        let tips: Vec<_> = d
            .targets
            .iter()
            .map(|s| (s.origin(), s.terminal()))
            .collect();
        let o = tips
            .iter()
            .position(|t| t.0 == d.markers[0])
            .expect("first marker at an origin");
        let want = if d.label == 1 {
            tips[o].1
        } else {
            tips[1 - o].1
        };
        assert_eq!(d.markers[1], want);
        assert!(
            d.pixels.contains(&255) && d.pixels.contains(&0),
            "min-max scaled"
        );
    }
}

#[test]
fn every_size_and_difficulty_generates() {
    for (size, difficulty, dashes) in [
        (32, "easy", 6),
        (32, "intermediate", 9),
        (64, "hard", 14),
        (128, "hard", 14),
    ] {
        let task = TaskSpec::parse(
            "pathfinder",
            &[
                ("size", size.to_string().as_str()),
                ("difficulty", difficulty),
            ],
        )
        .unwrap();
        assert_eq!(task.info().max_len, size * size);
        let ex = task.examples(1, Split::Test, 0..2).unwrap();
        for e in &ex {
            assert_eq!(e.tokens.len(), size * size);
            assert!(e.label < 2);
            assert!(
                e.meta
                    .as_ref()
                    .unwrap()
                    .contains(&format!("\"target_lengths\": [{dashes}, {dashes}]"))
            );
        }
    }
    let err = TaskSpec::parse("pathfinder", &[("size", "48")])
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("parameter `size` of task `pathfinder` must be 32, 64 or 128"),
        "{err}"
    );
    let err = TaskSpec::parse("pathfinder", &[("difficulty", "extreme")])
        .unwrap_err()
        .to_string();
    assert!(err.contains("`easy`, `intermediate` or `hard`"), "{err}");
}

#[test]
fn the_distractor_count_is_settable_and_auto_is_lras_budget() {
    use randattn::params::Auto;
    let with = |distractors: Auto<usize>| Pathfinder {
        difficulty: "easy".parse().unwrap(),
        distractors,
        ..Pathfinder::default()
    };
    // Easy at 32: curves of 6 dashes, distractors of 2, LRA's budget of 20 dashes = 10 snakes
    // (fewer where the image has no room left).
    let auto = drawings(&with(Auto::Auto), 50);
    assert!(auto.iter().all(|d| d.distractors.len() <= 10));
    assert!(auto.iter().map(|d| d.distractors.len()).sum::<usize>() > 50 * 8);
    assert!(
        drawings(&with(Auto::Fixed(0)), 50)
            .iter()
            .all(|d| d.distractors.is_empty())
    );
    assert!(
        drawings(&with(Auto::Fixed(3)), 50)
            .iter()
            .all(|d| d.distractors.len() <= 3)
    );
    // Without distractors fewer curves bridge the gap in negatives (measured, seed 9: joined
    // in 0.99 of positives and 0.47 of negatives, against 0.63 with LRA's distractors; the two
    // target curves start 7 px apart and often pass within 2 px of each other).
    let (pos, neg) = joined_rates(&drawings(&with(Auto::Fixed(0)), 300), 32);
    assert!(
        pos > 0.95 && pos - neg > 0.2,
        "joined: positives {pos}, negatives {neg}"
    );
}
