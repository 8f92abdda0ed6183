"""How much one final Euler step loses: the teacher's *correct* reflow couplings (single objects,
colours, counting; up to 8 per training prompt) re-noised to sigma with fresh Gaussian noise,
finished in one step by a model (`generate --latents … --sigmas SIGMA --cfg 1`), and scored with
`portaflow eval --images`. Needs numpy and safetensors (tools/golden/requirements.txt's venv).

  python3 tools/diagnostics/final_jump.py --couplings runs/reflow/couplings --sigma 0.25 \
      --out /tmp/jump [--lora assets/models/shapes-4nfe] [--bin target/release/portaflow]
"""
import argparse, json, os, subprocess

import numpy as np
from safetensors.numpy import save_file

ap = argparse.ArgumentParser()
ap.add_argument('--couplings', required=True, help='a reflow run\'s couplings/ folder')
ap.add_argument('--sigma', type=float, required=True)
ap.add_argument('--out', required=True)
ap.add_argument('--lora', help='a student folder; the base alone when absent')
ap.add_argument('--bin', default='target/release/portaflow')
ap.add_argument('--prompts', default='assets/prompts/shapes_train.jsonl')
args = ap.parse_args()

index = json.load(open(os.path.join(args.couplings, 'index.json')))
c, h, w = index['shape']
x0 = np.fromfile(os.path.join(args.couplings, 'x0.f32'), dtype='<f4').reshape(-1, c, h, w)
train = [json.loads(line) for line in open(args.prompts)]
rng = np.random.default_rng(0)
folder_index = 0
for p, spec in enumerate(train):
    if spec['tag'] not in {'single_object', 'colors', 'counting'}:
        continue
    ids = [i for i, (q, ok) in enumerate(zip(index['prompts'], index['correct'])) if q == p and ok][:8]
    if not ids:
        continue
    z = rng.standard_normal((len(ids), c, h, w)).astype('f4')
    # x_σ = (1 − σ)·x₀ + σ·z: [n, c, h, w]
    latents = (1 - args.sigma) * x0[ids] + args.sigma * z
    folder = os.path.join(args.out, f'{folder_index:05d}')
    os.makedirs(os.path.join(folder, 'samples'), exist_ok=True)
    open(os.path.join(folder, 'metadata.jsonl'), 'w').write(json.dumps(spec) + '\n')
    lat_path = os.path.join(folder, 'latents.safetensors')
    save_file({'latents': latents}, lat_path)
    png = os.path.join(folder, 'samples', 'x.png')
    cmd = [args.bin, '--device', 'cpu', 'generate', '--prompt', spec['prompt'], '--latents', lat_path,
           '--num-images', str(len(ids)), '--sigmas', str(args.sigma), '--sampler', 'euler',
           '--cfg', '1', '--out', png]
    if args.lora:
        cmd += ['--lora', args.lora]
    subprocess.run(cmd, check=True, capture_output=True)
    for j in range(len(ids)):
        written = png if len(ids) == 1 else os.path.join(folder, 'samples', f'x-{j}.png')
        os.rename(written, os.path.join(folder, 'samples', f'{j:05d}.png'))
    os.remove(lat_path)
    folder_index += 1
report = args.out.rstrip('/') + '.json'
subprocess.run([args.bin, '--device', 'cpu', 'eval', '--images', args.out, '--out', report],
               check=True, capture_output=True)
d = json.load(open(report))
images = d['images']
print(f"sigma {args.sigma}: {len(images)} images, overall {100 * d['overall']:.1f}%, "
      f"artifacts/image {sum(i['artifacts'] for i in images) / len(images):.2f}, "
      + ', '.join(f'{t} {100 * v:.1f}%' for t, v in sorted(d['tags'].items())))
