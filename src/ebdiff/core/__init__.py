"""The pure core of the method: no files, no training loop, no models of a particular family.

`diffusion` (the noise schedule, `DiffusionLoss`, timestep samplers, SpeeD / Min-SNR weights), `sampling`
(DDIM / DDPM and every registered sampler: one signature over any eps callable), `masks` (`ChannelMask`,
the ratio rule, Hamming distances), `earlybird` (`EarlyBirdDetector` -> `Ticket`), `regions` (TA-EB's
`RegionSet` and `RegionRouter`), `accounting` (training-time bookkeeping, `run_summary`) and `mfu`
(model FLOP/s against a device's peak). Everything here is tested with exact expectations.
"""
