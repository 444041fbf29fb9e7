"""Keras models converted with tf2onnx: what TensorFlow deployments hand to bnfold.

    pip install tensorflow-cpu tf2onnx
    python sample_models/make_keras_samples.py

Only this script needs TensorFlow; the tests read the .onnx and .npz files it writes. tf2onnx
writes a Keras Conv1D as Unsqueeze → Conv → Squeeze and keeps the graph channels-last with
Transposes around each Conv; a Keras BatchNormalization comes out as Mul and Add by per-channel
constants (or as a BatchNormalization between Transposes). Each BN gets trained-looking
statistics; `<name>.npz` holds the inputs (`in.input`) and Keras's own outputs (`out.output`).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import tensorflow as tf
import tf2onnx

HERE = Path(__file__).resolve().parent


def conv1d_network() -> tf.keras.Model:
    """Audio-style: Conv1D → BN → ReLU twice, pooled, Dense."""
    inputs = tf.keras.Input((32, 8), name="input")
    x = tf.keras.layers.Conv1D(16, 3, padding="same", use_bias=False)(inputs)
    x = tf.keras.layers.BatchNormalization(epsilon=1e-3)(x)
    x = tf.keras.layers.ReLU()(x)
    x = tf.keras.layers.Conv1D(16, 5, padding="same", dilation_rate=2)(x)
    x = tf.keras.layers.BatchNormalization(epsilon=1e-3)(x)
    x = tf.keras.layers.ReLU()(x)
    x = tf.keras.layers.GlobalAveragePooling1D()(x)
    return tf.keras.Model(inputs, tf.keras.layers.Dense(6, name="output")(x))


def channels_last_cnn() -> tf.keras.Model:
    """Image-style, channels-last: Conv2D → BN → ReLU, a depthwise block, pooled, Dense."""
    inputs = tf.keras.Input((16, 16, 3), name="input")
    x = tf.keras.layers.Conv2D(16, 3, strides=2, padding="same", use_bias=False)(inputs)
    x = tf.keras.layers.BatchNormalization(epsilon=1e-3)(x)
    x = tf.keras.layers.ReLU(6.0)(x)
    x = tf.keras.layers.DepthwiseConv2D(3, padding="same", use_bias=False)(x)
    x = tf.keras.layers.BatchNormalization(epsilon=1e-3)(x)
    x = tf.keras.layers.ReLU(6.0)(x)
    x = tf.keras.layers.Conv2D(24, 1, use_bias=False)(x)
    x = tf.keras.layers.BatchNormalization(epsilon=1e-3)(x)
    x = tf.keras.layers.GlobalAveragePooling2D()(x)
    return tf.keras.Model(inputs, tf.keras.layers.Dense(5, name="output")(x))


def trained_looking(model: tf.keras.Model, rng: np.random.Generator) -> None:
    for layer in model.layers:
        if isinstance(layer, tf.keras.layers.BatchNormalization):
            channels = layer.gamma.shape[0]
            layer.set_weights(
                [
                    rng.uniform(0.5, 1.5, channels),
                    rng.normal(0, 0.3, channels),
                    rng.normal(0, 0.3, channels),
                    rng.uniform(0.3, 2.0, channels),
                ]
            )


def export(model: tf.keras.Model, name: str, example: np.ndarray) -> None:
    spec = (tf.TensorSpec((None, *example.shape[1:]), tf.float32, name="input"),)
    onnx_model, _ = tf2onnx.convert.from_keras(model, input_signature=spec, opset=17)
    path = HERE / f"{name}.onnx"
    onnx.save(onnx_model, str(path))
    onnx.checker.check_model(onnx_model, full_check=True)
    output = model(example, training=False).numpy()
    np.savez(HERE / f"{name}.npz", **{"in.input": example, "out.output": output})
    kinds = sorted({n.op_type for n in onnx_model.graph.node})
    print(f"{path.name}: {path.stat().st_size / 1e3:.0f} kB; ops {', '.join(kinds)}")


def main() -> None:
    tf.keras.utils.set_random_seed(0)
    rng = np.random.default_rng(3)
    for name, model, shape in (
        ("keras_conv1d", conv1d_network(), (2, 32, 8)),
        ("keras_channels_last", channels_last_cnn(), (2, 16, 16, 3)),
    ):
        trained_looking(model, rng)
        export(model, name, rng.normal(0, 1, shape).astype(np.float32))


if __name__ == "__main__":
    main()
