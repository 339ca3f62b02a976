//! The executor's seam: a backend other than `CpuBackend` — here one that keeps its
//! values behind its own buffer type and checks every buffer it is handed against the
//! shapes of the call — runs the same step to the same bits, and the executor never
//! hands a backend a buffer that does not fit. A template for a new backend's tests.

use anyhow::Result;
use brisk_models::{
    Backend, BnArgs, ConvShape, CpuBackend, Engine, Executor, ModelSpec, Network, PoolPlan, Products,
};
use brisk_testkit::randn;
use candle_core::Device;

/// A buffer that is not a `Vec<f32>`, so the executor can only reach it through the trait.
#[derive(Clone, Debug, Default)]
struct Cell(Box<[f32]>);

/// `CpuBackend`'s arithmetic on [`Cell`]s, with each call's buffer lengths checked.
#[derive(Debug)]
struct Checked;

type R<T> = brisk_models::Result<T>;

fn fits(what: &str, buf: &Cell, len: usize) {
    assert_eq!(
        buf.0.len(),
        len,
        "{what}: a buffer of {} values where the shape holds {len}",
        buf.0.len()
    );
}

fn vec(c: &Cell) -> Vec<f32> {
    c.0.to_vec()
}

fn cell(v: Vec<f32>) -> Cell {
    Cell(v.into_boxed_slice())
}

fn bn(p: &BnArgs<Cell>) -> (Vec<f32>, Vec<f32>) {
    fits("bn stats", p.stats, 2 * p.c);
    fits("bn affine", p.affine, 2 * p.c);
    (vec(p.stats), vec(p.affine))
}

fn args<'a>(p: &BnArgs<Cell>, stats: &'a Vec<f32>, affine: &'a Vec<f32>) -> BnArgs<'a, Vec<f32>> {
    BnArgs {
        n: p.n,
        c: p.c,
        hw: p.hw,
        stats,
        affine,
        eps: p.eps,
    }
}

impl Backend for Checked {
    type Buf = Cell;

    fn name(&self) -> &'static str {
        "checked"
    }
    fn upload(&self, values: Vec<f32>) -> R<Cell> {
        Ok(cell(values))
    }
    fn download(&self, buf: &Cell) -> R<Vec<f32>> {
        Ok(vec(buf))
    }
    fn download_owned(&self, buf: Cell) -> R<Vec<f32>> {
        Ok(buf.0.into_vec())
    }
    fn conv_forward(&self, g: &ConvShape, x: &Cell, w: &Cell, products: Products) -> R<Cell> {
        fits("conv input", x, g.n * g.cin * g.h * g.w);
        fits("conv weight", w, g.cout * g.cin * g.k * g.k);
        CpuBackend.conv_forward(g, &vec(x), &vec(w), products).map(cell)
    }
    fn conv_input_grad(&self, g: &ConvShape, dy: &Cell, w: &Cell, products: Products) -> R<Cell> {
        fits("conv output gradient", dy, g.n * g.cout * g.ho * g.wo);
        fits("conv weight", w, g.cout * g.cin * g.k * g.k);
        CpuBackend
            .conv_input_grad(g, &vec(dy), &vec(w), products)
            .map(cell)
    }
    fn conv_weight_grad(&self, g: &ConvShape, x: &Cell, dy: &Cell, products: Products) -> R<Cell> {
        fits("conv input", x, g.n * g.cin * g.h * g.w);
        fits("conv output gradient", dy, g.n * g.cout * g.ho * g.wo);
        CpuBackend
            .conv_weight_grad(g, &vec(x), &vec(dy), products)
            .map(cell)
    }
    fn bn_stats(&self, x: &Cell, (n, c, hw): (usize, usize, usize)) -> R<Cell> {
        fits("bn input", x, n * c * hw);
        CpuBackend.bn_stats(&vec(x), (n, c, hw)).map(cell)
    }
    fn bn_normalize(&self, x: &Cell, p: &BnArgs<Cell>, relu: bool, residual: Option<&Cell>) -> R<Cell> {
        fits("bn input", x, p.n * p.c * p.hw);
        if let Some(r) = residual {
            fits("bn residual", r, p.n * p.c * p.hw);
        }
        let (s, a) = bn(p);
        let r = residual.map(vec);
        CpuBackend
            .bn_normalize(&vec(x), &args(p, &s, &a), relu, r.as_ref())
            .map(cell)
    }
    fn bn_grad_sums(&self, x: &Cell, dz: &Cell, p: &BnArgs<Cell>) -> R<Cell> {
        fits("bn input", x, p.n * p.c * p.hw);
        fits("bn gradient", dz, p.n * p.c * p.hw);
        let (s, a) = bn(p);
        CpuBackend
            .bn_grad_sums(&vec(x), &vec(dz), &args(p, &s, &a))
            .map(cell)
    }
    fn bn_input_grad(&self, x: &Cell, dz: &mut Cell, p: &BnArgs<Cell>, sums: &Cell) -> R<()> {
        fits("bn input", x, p.n * p.c * p.hw);
        fits("bn gradient", dz, p.n * p.c * p.hw);
        fits("bn sums", sums, 2 * p.c);
        let (s, a) = bn(p);
        let mut d = vec(dz);
        CpuBackend.bn_input_grad(&vec(x), &mut d, &args(p, &s, &a), &vec(sums))?;
        *dz = cell(d);
        Ok(())
    }
    fn relu_backward(&self, y: &Cell, dy: &mut Cell) -> R<()> {
        fits("relu gradient", dy, y.0.len());
        let mut d = vec(dy);
        CpuBackend.relu_backward(&vec(y), &mut d)?;
        *dy = cell(d);
        Ok(())
    }
    fn round_half(&self, x: &mut Cell, to: brisk_precision::Dtype) -> R<()> {
        let mut v = vec(x);
        CpuBackend.round_half(&mut v, to)?;
        *x = cell(v);
        Ok(())
    }
    fn add_assign(&self, dst: &mut Cell, src: &Cell) -> R<()> {
        fits("add", src, dst.0.len());
        let mut d = vec(dst);
        CpuBackend.add_assign(&mut d, &vec(src))?;
        *dst = cell(d);
        Ok(())
    }
    fn add_relu(&self, dst: &mut Cell, src: &Cell) -> R<()> {
        fits("add + relu", src, dst.0.len());
        let mut d = vec(dst);
        CpuBackend.add_relu(&mut d, &vec(src))?;
        *dst = cell(d);
        Ok(())
    }
    fn relu(&self, x: &mut Cell) -> R<()> {
        let mut d = vec(x);
        CpuBackend.relu(&mut d)?;
        *x = cell(d);
        Ok(())
    }
    fn sigmoid(&self, x: &mut Cell) -> R<()> {
        let mut d = vec(x);
        CpuBackend.sigmoid(&mut d)?;
        *x = cell(d);
        Ok(())
    }
    fn relu_mask(&self, d: &Cell, h: &Cell) -> R<Cell> {
        fits("relu mask", h, d.0.len());
        CpuBackend.relu_mask(&vec(d), &vec(h)).map(cell)
    }
    fn max_pool(&self, pool: &PoolPlan, x: &Cell, planes: usize, hw: (usize, usize)) -> R<Cell> {
        fits("max-pool input", x, planes * hw.0 * hw.1);
        CpuBackend.max_pool(pool, &vec(x), planes, hw).map(cell)
    }
    fn max_pool_backward(
        &self,
        pool: &PoolPlan,
        x: &Cell,
        dy: &Cell,
        planes: usize,
        hw: (usize, usize),
    ) -> R<Cell> {
        fits("max-pool input", x, planes * hw.0 * hw.1);
        fits(
            "max-pool gradient",
            dy,
            planes * pool.out_size(hw.0) * pool.out_size(hw.1),
        );
        CpuBackend
            .max_pool_backward(pool, &vec(x), &vec(dy), planes, hw)
            .map(cell)
    }
    fn global_average(&self, x: &Cell, planes: usize, hw: usize) -> R<Cell> {
        fits("average input", x, planes * hw);
        CpuBackend.global_average(&vec(x), planes, hw).map(cell)
    }
    fn spread_average(&self, d: &Cell, planes: usize, hw: usize) -> R<Cell> {
        fits("average gradient", d, planes);
        CpuBackend.spread_average(&vec(d), planes, hw).map(cell)
    }
    fn dense(&self, x: &Cell, w: &Cell, b: &Cell, (n, fin, fout): (usize, usize, usize)) -> R<Cell> {
        fits("dense input", x, n * fin);
        fits("dense weight", w, fout * fin);
        fits("dense bias", b, fout);
        CpuBackend
            .dense(&vec(x), &vec(w), &vec(b), (n, fin, fout))
            .map(cell)
    }
    fn dense_backward(
        &self,
        dout: &Cell,
        x: &Cell,
        w: &Cell,
        (n, fin, fout): (usize, usize, usize),
    ) -> R<(Cell, Cell, Cell)> {
        fits("dense output gradient", dout, n * fout);
        fits("dense input", x, n * fin);
        fits("dense weight", w, fout * fin);
        let (dx, dw, db) = CpuBackend.dense_backward(&vec(dout), &vec(x), &vec(w), (n, fin, fout))?;
        Ok((cell(dx), cell(dw), cell(db)))
    }
    fn scale_planes(&self, y: &Cell, gate: &Cell, hw: usize) -> R<Cell> {
        fits("scaled planes", y, gate.0.len() * hw);
        CpuBackend.scale_planes(&vec(y), &vec(gate), hw).map(cell)
    }
    fn gate_grad(&self, dz: &Cell, y: &Cell, gate: &Cell, hw: usize) -> R<Cell> {
        fits("gate output gradient", dz, gate.0.len() * hw);
        fits("gated planes", y, gate.0.len() * hw);
        CpuBackend.gate_grad(&vec(dz), &vec(y), &vec(gate), hw).map(cell)
    }
    fn scale_planes_backward(&self, dz: &Cell, gate: &Cell, dpooled: &Cell, hw: usize) -> R<Cell> {
        fits("gate output gradient", dz, gate.0.len() * hw);
        fits("pooled gradient", dpooled, gate.0.len());
        CpuBackend
            .scale_planes_backward(&vec(dz), &vec(gate), &vec(dpooled), hw)
            .map(cell)
    }
}

/// One training step and one evaluation on each executor, from equal networks.
fn same_bits(spec: ModelSpec, n: usize) -> Result<()> {
    let size = spec.image_size;
    let x = randn(5, 0.0, 1.0, (n, spec.in_channels, size, size))?
        .flatten_all()?
        .to_vec1::<f32>()?;
    let probe = randn(6, 0.0, 1.0, (n, spec.classes))?
        .flatten_all()?
        .to_vec1::<f32>()?;
    let (a, b) = (
        Network::new(spec.clone(), 11, &Device::Cpu)?,
        Network::new(spec.clone(), 11, &Device::Cpu)?,
    );
    let mut cpu = Engine::new(&a)?;
    let mut checked = Executor::with_backend(&b, Checked)?;
    let name = format!("{} {} w{}", spec.arch, spec.stem, spec.width);
    assert_eq!(
        cpu.forward_train(&x, n)?,
        checked.forward_train(&x, n)?,
        "{name}: logits"
    );
    let (mut g1, mut g2) = (cpu.backward(&probe)?, checked.backward(&probe)?);
    g1.sort_by(|p, q| p.0.cmp(&q.0));
    g2.sort_by(|p, q| p.0.cmp(&q.0));
    assert_eq!(g1, g2, "{name}: gradients");
    for ((tensor, va), (_, vb)) in a.buffer_vars()?.iter().zip(&b.buffer_vars()?) {
        let (va, vb) = (va.as_tensor().to_vec1::<f32>()?, vb.as_tensor().to_vec1::<f32>()?);
        assert_eq!(va, vb, "{name}: running statistic {tensor}");
    }
    assert_eq!(
        cpu.forward_eval(&x, n)?,
        checked.forward_eval(&x, n)?,
        "{name}: evaluation logits"
    );
    Ok(())
}

#[test]
fn another_backend_runs_the_same_step_to_the_same_bits() -> Result<()> {
    let sized = |spec: ModelSpec, image| ModelSpec {
        image_size: image,
        ..spec
    };
    same_bits(sized(ModelSpec::resnet18_cifar(10).with_width(0.125), 16), 3)?;
    same_bits(sized(ModelSpec::seresnet18_cifar(10).with_width(0.25), 16), 2)?;
    same_bits(sized(ModelSpec::resnet18(7).with_width(0.125), 64), 2)?;
    Ok(())
}
