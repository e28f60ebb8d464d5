// A chat and a stream through Boundless with the official OpenAI Node SDK; prints one JSON line.
import OpenAI from 'openai';

const client = new OpenAI({ apiKey: process.env.BOUNDLESS_KEY, baseURL: process.env.BOUNDLESS_BASE_URL, maxRetries: 0 });
const messages = [{ role: 'user', content: 'Hello!' }];

const chat = await client.chat.completions.create({ model: 'free-model', messages });
let streamed = '';
const stream = await client.chat.completions.create({ model: 'free-model', messages, stream: true });
for await (const chunk of stream) {
  streamed += chunk.choices[0]?.delta?.content ?? '';
}
let status = null;
try {
  await new OpenAI({ apiKey: 'sk-wrong', baseURL: process.env.BOUNDLESS_BASE_URL, maxRetries: 0 }).models.list();
} catch (err) {
  status = err.status;
}
console.log(JSON.stringify({ chat: chat.choices[0].message.content, usage: chat.usage, streamed, status }));
