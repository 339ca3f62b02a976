//! `brisk pack`, `inspect`, `verify` and `preview`: datasets into shards, and what is in them.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use brisk_data::{
    pack_cifar, pack_folder, pack_idx, pack_synthetic, Cifar, Dataset, IdxFiles, Manifest, Split,
    SyntheticConfig,
};

#[derive(Debug, clap::Args)]
pub struct PackArgs {
    #[command(subcommand)]
    source: Source,
}

/// Options every importer shares.
#[derive(Debug, clap::Args)]
struct Common {
    /// Output folder for the shards and manifest.json (created; must not already hold a dataset).
    #[arg(long, value_name = "DIR")]
    out: PathBuf,
    /// Images per shard file.
    #[arg(long, default_value_t = 10_000, value_parser = clap::value_parser!(u64).range(1..))]
    shard_size: u64,
    /// Print the manifest as one JSON object on stdout.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, clap::Subcommand)]
enum Source {
    /// The built-in synthetic set: 10 classes of shapes and patterns with random colours,
    /// position, scale, rotation, clutter and noise; deterministic given the seed.
    Synthetic {
        #[command(flatten)]
        common: Common,
        /// Training images.
        #[arg(long, default_value_t = 20_000)]
        train: usize,
        /// Test images.
        #[arg(long, default_value_t = 4_000)]
        test: usize,
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// Image side in pixels.
        #[arg(long, default_value_t = 32)]
        size: usize,
    },
    /// CIFAR-10 binary version (data_batch_1..5.bin, test_batch.bin, batches.meta.txt).
    Cifar10 {
        #[command(flatten)]
        common: Common,
        /// Folder holding the .bin files.
        #[arg(long, value_name = "DIR")]
        input: PathBuf,
    },
    /// CIFAR-100 binary version (train.bin, test.bin, fine/coarse_label_names.txt).
    Cifar100 {
        #[command(flatten)]
        common: Common,
        /// Folder holding the .bin files.
        #[arg(long, value_name = "DIR")]
        input: PathBuf,
        /// Use the 20 coarse labels instead of the 100 fine ones.
        #[arg(long)]
        coarse: bool,
    },
    /// MNIST-style IDX files, optionally gzip'd (any image size, one channel).
    Idx {
        #[command(flatten)]
        common: Common,
        #[arg(long, value_name = "FILE")]
        images: PathBuf,
        #[arg(long, value_name = "FILE")]
        labels: PathBuf,
        #[arg(long, value_name = "FILE")]
        test_images: PathBuf,
        #[arg(long, value_name = "FILE")]
        test_labels: PathBuf,
    },
    /// A folder with one sub-folder of PNG/JPEG images per class (or train/ and test/
    /// folders of those), resized (shorter side) and centre-cropped.
    Folder {
        #[command(flatten)]
        common: Common,
        #[arg(long, value_name = "DIR")]
        input: PathBuf,
        /// Image side in pixels after resizing and cropping.
        #[arg(long, default_value_t = 32)]
        size: usize,
        /// Share of the images put in the test split (when there are no train/ and test/ folders).
        #[arg(long, default_value_t = 0.1)]
        test_fraction: f64,
    },
}

fn report(m: &Manifest, dir: &Path, json: bool) -> Result<()> {
    if json {
        println!("{}", serde_json::to_string(m)?);
    } else {
        println!(
            "packed {} into {}: {} train + {} test images of {}x{}x{}, {} classes, {} shards",
            m.name,
            dir.display(),
            m.count(Split::Train),
            m.count(Split::Test),
            m.height,
            m.width,
            m.channels,
            m.classes.len(),
            m.shards.len()
        );
    }
    Ok(())
}

pub fn pack(args: &PackArgs) -> Result<()> {
    let (common, manifest) = match &args.source {
        Source::Synthetic {
            common,
            train,
            test,
            seed,
            size,
        } => {
            eprintln!("brisk pack synthetic: {train} train + {test} test images of {size}x{size}…");
            let config = SyntheticConfig {
                train: *train,
                test: *test,
                seed: *seed,
                size: *size,
            };
            (
                common,
                pack_synthetic(&common.out, &config, common.shard_size as usize)?,
            )
        }
        Source::Cifar10 { common, input } => (
            common,
            pack_cifar(input, &common.out, Cifar::Ten, common.shard_size as usize)?,
        ),
        Source::Cifar100 {
            common,
            input,
            coarse,
        } => {
            let which = if *coarse {
                Cifar::HundredCoarse
            } else {
                Cifar::HundredFine
            };
            (
                common,
                pack_cifar(input, &common.out, which, common.shard_size as usize)?,
            )
        }
        Source::Idx {
            common,
            images,
            labels,
            test_images,
            test_labels,
        } => {
            let train = IdxFiles {
                images: images.clone(),
                labels: labels.clone(),
            };
            let test = IdxFiles {
                images: test_images.clone(),
                labels: test_labels.clone(),
            };
            (
                common,
                pack_idx(&train, &test, &common.out, common.shard_size as usize)?,
            )
        }
        Source::Folder {
            common,
            input,
            size,
            test_fraction,
        } => (
            common,
            pack_folder(
                input,
                &common.out,
                *size,
                *test_fraction,
                common.shard_size as usize,
            )?,
        ),
    };
    report(&manifest, &common.out, common.json)
}

#[derive(Debug, clap::Args)]
pub struct InspectArgs {
    /// Dataset folder (with manifest.json).
    dir: PathBuf,
    /// Print one JSON object on stdout.
    #[arg(long)]
    json: bool,
}

pub fn inspect(args: &InspectArgs) -> Result<()> {
    let d = Dataset::open(&args.dir)?;
    let m = d.manifest();
    let hist = |s| d.class_histogram(s);
    if args.json {
        let v = serde_json::json!({
            "name": m.name, "classes": m.classes, "height": m.height, "width": m.width,
            "channels": m.channels, "mean": m.mean, "std": m.std, "shards": m.shards.len(),
            "train": m.count(Split::Train), "test": m.count(Split::Test),
            "train_per_class": hist(Split::Train), "test_per_class": hist(Split::Test),
        });
        println!("{v}");
        return Ok(());
    }
    println!(
        "{} ({}), {}x{}x{} u8, {} shards",
        args.dir.display(),
        m.name,
        m.height,
        m.width,
        m.channels,
        m.shards.len()
    );
    println!(
        "train {} images, test {} images, {} classes",
        m.count(Split::Train),
        m.count(Split::Test),
        m.classes.len()
    );
    println!("mean {:?}  std {:?}", m.mean, m.std);
    let (tr, te) = (hist(Split::Train), hist(Split::Test));
    println!("{:>4} {:<24} {:>8} {:>8}", "#", "class", "train", "test");
    for (i, name) in m.classes.iter().enumerate() {
        println!("{i:>4} {name:<24} {:>8} {:>8}", tr[i], te[i]);
    }
    Ok(())
}

#[derive(Debug, clap::Args)]
pub struct PreviewArgs {
    /// Dataset folder.
    dir: PathBuf,
    /// PNG file to write.
    #[arg(long, value_name = "FILE")]
    out: PathBuf,
    /// Images per class (one row per class).
    #[arg(long, default_value_t = 8)]
    per_class: usize,
    /// Scale factor for each image.
    #[arg(long, default_value_t = 3)]
    zoom: u32,
    /// Preview the test split instead of the training split.
    #[arg(long)]
    test: bool,
}

pub fn preview(args: &PreviewArgs) -> Result<()> {
    let d = Dataset::open(&args.dir)?;
    let split = if args.test { Split::Test } else { Split::Train };
    let rows = brisk_data::write_preview(&d, split, args.per_class.max(1), args.zoom.max(1), &args.out)
        .with_context(|| format!("preview of {}", args.dir.display()))?;
    eprintln!("wrote {}; rows, top to bottom:", args.out.display());
    for (i, name) in rows.iter().enumerate() {
        eprintln!("  {i}: {name}");
    }
    Ok(())
}
