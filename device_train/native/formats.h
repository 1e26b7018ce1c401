// The on-disk formats' names, shared with the Python runtime. Generated from runtime/formats.py
// by `python -m blockskip.runtime.formats --write docs/schemas`; do not edit (docs/formats.md).
#pragma once

namespace blockskip {
namespace formats {

inline constexpr char kManifest[] = "manifest.json";
inline constexpr int kSchemaVersion = 2;
inline constexpr char kManifestSha256[] = "canonical_sha256";
inline constexpr char kCacheIndex[] = "index.json";
inline constexpr char kShardPrefix[] = "entry_";
inline constexpr int kShardDigits = 5;
inline constexpr char kShardSuffix[] = ".safetensors";
inline constexpr char kCheckpointDir[] = "checkpoint";
inline constexpr char kCheckpoint[] = "checkpoint.safetensors";
inline constexpr char kLoraFile[] = "lora.safetensors";
inline constexpr char kTrainLog[] = "train_log.json";
inline constexpr char kLockFile[] = ".blockskip.lock";
inline constexpr char kTempPrefix[] = ".";
inline constexpr char kTempSuffix[] = ".tmp";
inline constexpr char kRecordFile[] = "file";
inline constexpr char kRecordSha256[] = "sha256";
inline constexpr char kRecordSize[] = "size";
inline constexpr char kIndexSource[] = "source";
inline constexpr char kIndexSourceSha256[] = "source_sha256";
inline constexpr char kIndexSchedule[] = "schedule";
inline constexpr char kIndexEntries[] = "entries";
inline constexpr char kIndexMaxResidentBlocks[] = "max_resident_blocks";
inline constexpr char kIndexPeakRssMib[] = "peak_rss_mib";
inline constexpr char kIndexStartRssMib[] = "start_rss_mib";
inline constexpr char kSourceBundle[] = "bundle";
inline constexpr char kSourceImages[] = "images";
inline constexpr char kScheduleMeta[] = "meta";
inline constexpr char kScheduleEntries[] = "entries";
inline constexpr char kEntryIn[] = "in.";
inline constexpr char kEntryConst[] = "c.";
inline constexpr char kEntryDelta[] = "delta.";
inline constexpr char kEntryTarget[] = "target";
inline constexpr char kStateHidden[] = "hidden";
inline constexpr char kState[] = "state.";
inline constexpr char kConst[] = "c.";
inline constexpr char kGrad[] = "grad.";
inline constexpr char kWeight[] = "w.";
inline constexpr char kLora[] = "lora.";
inline constexpr char kOut[] = "out.";
inline constexpr char kGradIn[] = "grad_in.";
inline constexpr char kLoraGrad[] = "lora_grad.";
inline constexpr char kLoss[] = "loss";
inline constexpr char kLossScale[] = "loss_scale";
inline constexpr char kEmbed[] = "embed";
inline constexpr char kText[] = "text.";
inline constexpr char kParam[] = "param.";
inline constexpr char kOpt[] = "opt.";
inline constexpr char kOptStep[] = "opt.step.";
inline constexpr char kOptExpAvg[] = "opt.exp_avg.";
inline constexpr char kOptExpAvgSq[] = "opt.exp_avg_sq.";
inline constexpr char kMetaStep[] = "step";
inline constexpr char kMetaLog[] = "log";
inline constexpr char kMetaSha256[] = "sha256";
inline constexpr char kLogCacheSource[] = "cache_source";
inline constexpr char kLogLosses[] = "losses";
inline constexpr char kLogStepSeconds[] = "step_seconds";
inline constexpr char kLogLossWithoutLora[] = "entry0_loss_without_lora";
inline constexpr char kLogPredictedStepSeconds[] = "predicted_step_seconds";
inline constexpr char kLoraPrefix[] = "transformer.";
inline constexpr char kPeftAdapter[] = ".default.";
inline constexpr char kLoraA[] = ".lora_A.";
inline constexpr char kLoraB[] = ".lora_B.";
inline constexpr char kLoraMetaFormat[] = "format";
inline constexpr char kLoraMetaAdapter[] = "lora_adapter_metadata";
inline constexpr char kScheduleRng[] = "splitmix64-v1";
inline constexpr int kPhotoMinSide = 64;
inline constexpr int kPhotoMaxPixels = 40000000;
inline constexpr int kMaxSamples = 100000;
inline constexpr int kMaxImages = 100000;
inline constexpr int kMaxSteps = 10000000;
inline constexpr int kMaxGradAccum = 10000;
inline constexpr int kMaxRank = 4096;
inline constexpr int kMaxSide = 16384;
inline constexpr int kMaxJsonDepth = 64;

}  // namespace formats
}  // namespace blockskip
