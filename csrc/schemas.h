// Schemas of every operator of the `app` library: csrc/ops.cpp declares them, and the tests' emulated library
// (tests/emulation) declares the same strings, so that the two cannot drift apart.
#pragma once

namespace app {
namespace schema {

// Mean of `values` (B, C, H, W) over the pixels of each segment of `segments` (B, H, W), broadcast back
// to every pixel of that segment (thesis Eq. 4.13). Ids must lie in [0, num_segments).
inline constexpr const char* kSegmentMean = "segment_mean(Tensor values, Tensor segments, int num_segments) -> Tensor";

// ConvCRF message passing (Eq. 6): out[b,c,p] = sum over the filter_size x filter_size window around p,
// centre excluded, of exp(-1/2 |features[b,:,p] - features[b,:,p']|^2) * q[b,c,p'].
inline constexpr const char* kGaussianMessage =
    "gaussian_message(Tensor q, Tensor features, int filter_size) -> Tensor";

// Gradient of gaussian_message with respect to `features`, given the output gradient `grad` (B, C, H, W).
inline constexpr const char* kGaussianMessageFeaturesBackward =
    "gaussian_message_features_backward(Tensor grad, Tensor q, Tensor features, int filter_size) -> Tensor";

// Min-sum message passing on a D-connected grid (thesis Alg. 1-2, Eq. 3.3-3.10): unary (B, L, H, W), pairwise
// (L, L), edge_weights (B, D/2, H, W), all float32/float64; method 0 = ISGMR, 1 = TRWP, 2 = SGM; pairwise_kind
// 0 = general, 1 = Potts, 2 = truncated linear, 3 = truncated quadratic (O(L) paths, parameters read from the
// matrix). Returns the costs (B, L, H, W) and the argmin indices p (I, D, B, H, W, L) and q (I, D, B, H, W), uint8
// for L <= 256, int16 up to 32768 labels, int32 above.
inline constexpr const char* kMessagePassing =
    "message_passing(Tensor unary, Tensor pairwise, Tensor edge_weights, int method, int n_directions, "
    "int n_iterations, int pairwise_kind) -> (Tensor, Tensor, Tensor)";

// Gradients of unary, pairwise (zeros unless pairwise_grad) and edge_weights (zeros unless weights_grad) from the
// stored indices (Alg. 3-4, Eq. 3.30-3.36); pairwise_kind as passed to the forward.
inline constexpr const char* kMessagePassingBackward =
    "message_passing_backward(Tensor grad_costs, Tensor pairwise, Tensor edge_weights, Tensor p, Tensor q, "
    "int method, int n_directions, int n_iterations, int pairwise_kind, bool pairwise_grad, bool weights_grad) "
    "-> (Tensor, Tensor, Tensor)";

// Local mean-field (csrc/message_passing/meanfield.h): unary (B, L, H, W), pairwise (L, L), edge_weights
// (B, D/2, H, W), float32/float64; pairwise_kind as for message_passing. Returns the costs (B, L, H, W) and the
// distributions q (I, B, L, H, W) of every iteration, what the backward needs.
inline constexpr const char* kMeanfield =
    "meanfield(Tensor unary, Tensor pairwise, Tensor edge_weights, int n_directions, int n_iterations, "
    "int pairwise_kind) -> (Tensor, Tensor)";

// Gradients of unary, pairwise (zeros unless pairwise_grad) and edge_weights from the stored q.
inline constexpr const char* kMeanfieldBackward =
    "meanfield_backward(Tensor grad_costs, Tensor pairwise, Tensor edge_weights, Tensor q, int n_directions, "
    "int pairwise_kind, bool pairwise_grad) -> (Tensor, Tensor, Tensor)";

}  // namespace schema
}  // namespace app
