"""kanfast.plot: the network figure (Liu et al. 2024 figures) as a PNG."""

import matplotlib

matplotlib.use("Agg")

import matplotlib.image as mpimg  # noqa: E402
import matplotlib.pyplot as plt  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

import kanfast  # noqa: E402
from kanfast import KAN  # noqa: E402

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _check_png(path, min_bytes=8_000):
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC
    assert min_bytes < len(data) < 5_000_000
    img = mpimg.imread(str(path))
    assert img.ndim == 3 and img.shape[0] > 200 and img.shape[1] > 200
    return img


def test_plot_writes_png_with_curves(tmp_path):
    torch.manual_seed(0)
    model = KAN([2, 3, 1], grid_size=5, dtype=torch.float64)
    x = torch.rand(100, 2, dtype=torch.float64) * 2 - 1
    path = tmp_path / "net.png"
    fig = kanfast.plot(model, x, path=str(path), in_vars=["x", "y"], out_vars=["f"], title="test")
    img = _check_png(path)
    # the network has ink: not a blank canvas (curves, lines, nodes)
    dark = (img[..., :3].mean(-1) < 0.5).mean()
    assert dark > 1e-3
    # one panel per edge (2*3 + 3*1) besides the canvas axes
    assert len(fig.axes) == 1 + 2 * 3 + 3
    plt.close(fig)


def test_plot_without_x_pruned_and_symbolic(tmp_path):
    torch.manual_seed(1)
    model = KAN([2, 2, 1], grid_size=4, dtype=torch.float64)
    model.layers[0].edge_mask = torch.tensor([[1.0, 0.0], [1.0, 1.0]], dtype=torch.float64)
    kanfast.fix_symbolic(model, 1, 0, 0, "sin", fit_params=False, params=(1.0, 0.0, 1.0, 0.0))
    path = tmp_path / "sym.png"
    fig = kanfast.plot(model, path=str(path))
    _check_png(path)
    # masked edge (0,1,0) is not drawn: 3 numeric panels + 2 in layer 1 (one symbolic)
    assert len(fig.axes) == 1 + 3 + 2
    titles = [a.get_title() for a in fig.axes]
    assert "sin" in titles
    plt.close(fig)


def test_plot_is_a_function_in_the_namespace():
    assert callable(kanfast.plot)
    with pytest.raises(ValueError):
        kanfast.plot(KAN([2, 1]), torch.zeros(4, 3))


def _canvas_texts(fig):
    return [t.get_text() for t in fig.axes[0].texts]


def test_plot_labels_nodes_by_default():
    torch.manual_seed(2)
    fig = kanfast.plot(KAN([2, 3, 1], grid_size=4, dtype=torch.float64))
    texts = _canvas_texts(fig)
    for label in ("$x_{1}$", "$x_{2}$", "$y_{1}$", "$h_{1,1}$", "$h_{1,2}$", "$h_{1,3}$"):
        assert label in texts, (label, texts)
    plt.close(fig)
    # names given replace the defaults; node_labels=False keeps only those given
    fig = kanfast.plot(KAN([2, 3, 1], grid_size=4), in_vars=["a", "b"], out_vars=["f"])
    texts = _canvas_texts(fig)
    assert {"a", "b", "f", "$h_{1,1}$"} <= set(texts) and "$x_{1}$" not in texts
    plt.close(fig)
    fig = kanfast.plot(KAN([2, 3, 1], grid_size=4), in_vars=["a", "b"], node_labels=False)
    assert sorted(_canvas_texts(fig)) == ["a", "b"]
    plt.close(fig)


def test_plot_rejects_wrong_number_of_labels():
    with pytest.raises(ValueError, match="in_vars has 1 labels for 2 nodes"):
        kanfast.plot(KAN([2, 1]), in_vars=["x"])
    with pytest.raises(ValueError, match="out_vars"):
        kanfast.plot(KAN([2, 1]), out_vars=["y", "z"])
